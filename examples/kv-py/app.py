"""kv-py: key-value and config from Python (componentize-py).

    GET /kv-py/visit              counts a visit (atomic increment) and greets
                                  with the `greeting` config value
    PUT /kv-py/set?key=K&value=V
    GET /kv-py/get?key=K          the value, or 404

A store error answers 500 with the error the host returned (the host never
puts its internals in it).
"""

from urllib.parse import parse_qs

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import atomics, wasi_config_store, wasi_keyvalue_store
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam


def respond(response_out, status, text):
    response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
    response.set_status_code(status)
    body = response.body()
    ResponseOutparam.set(response_out, Ok(response))
    stream = body.write()
    stream.blocking_write_and_flush(text.encode())
    stream.__exit__(None, None, None)
    OutgoingBody.finish(body, None)


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out):
        path = request.path_with_query() or "/"
        route, _, query = path.partition("?")
        route = route.rsplit("/", 1)[-1]
        params = {k: v[0] for k, v in parse_qs(query).items()}
        try:
            bucket = wasi_keyvalue_store.open("default")
            if route == "visit":
                n = atomics.increment(bucket, "kv-py-visits", 1)
                greeting = wasi_config_store.get("greeting") or "Hello"
                respond(response_out, 200, f"{greeting} You are visitor #{n} (Python).\n")
            elif route == "set":
                bucket.set(params.get("key", ""), params.get("value", "").encode())
                respond(response_out, 200, "stored\n")
            elif route == "get":
                value = bucket.get(params.get("key", ""))
                if value is None:
                    respond(response_out, 404, "no such key\n")
                else:
                    respond(response_out, 200, value.decode())
            else:
                respond(response_out, 404, "unknown kv-py route\n")
        except Err as e:
            respond(response_out, 500, f"store error: {e.value}\n")
