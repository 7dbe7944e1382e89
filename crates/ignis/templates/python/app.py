"""{{name}}: a wasi:http 0.2 function for Ignis in Python, built with
componentize-py. `ignis up` builds it (see ignis.toml) and serves it:
`curl localhost:8080/` greets you with the `greeting` config value and
counts your visit in the key-value store.
"""

from componentize_py_types import Ok
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
        try:
            visits = atomics.increment(wasi_keyvalue_store.open("default"), "visits", 1)
            greeting = wasi_config_store.get("greeting") or "Hello"
            respond(response_out, 200, f"{greeting} You asked for {path}; visit #{visits}.\n")
        except Exception as e:  # a store error; the host never puts its internals in it
            respond(response_out, 500, f"store error: {e!r}\n")
