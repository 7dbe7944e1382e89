"""hello-py: a wasi:http 0.2 function in Python (componentize-py).

`ignis up examples` builds it with scripts/componentize.sh (see
examples/ignis.toml).
"""

from componentize_py_types import Ok
from wit_world import exports
from wit_world.imports.types import Fields, OutgoingBody, OutgoingResponse, ResponseOutparam


class IncomingHandler(exports.IncomingHandler):
    def handle(self, request, response_out):
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        stream = body.write()
        stream.blocking_write_and_flush(b"Hello from Ignis, in Python!\n")
        stream.__exit__(None, None, None)
        OutgoingBody.finish(body, None)
