// {{name}}: a wasi:http 0.2 function for Ignis in JavaScript, built with
// componentize-js (StarlingMonkey). `ignis up` builds it (see ignis.toml)
// and serves it: `curl localhost:8080/` greets you with the `greeting`
// config value and counts your visit in the key-value store.
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';
import { open } from 'wasi:keyvalue/store@0.2.0-draft2';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft2';
import { get as configGet } from 'wasi:config/store@0.2.0-rc.1';

const encoder = new TextEncoder();

function respond(outparam, status, text) {
  const response = new OutgoingResponse(new Fields([['content-type', encoder.encode('text/plain')]]));
  response.setStatusCode(status);
  const body = response.body();
  ResponseOutparam.set(outparam, { tag: 'ok', val: response });
  const stream = body.write();
  stream.blockingWriteAndFlush(encoder.encode(text));
  stream[Symbol.dispose]();
  OutgoingBody.finish(body, undefined);
}

export const incomingHandler = {
  handle(request, outparam) {
    const path = request.pathWithQuery() || '/';
    try {
      const visits = increment(open('default'), 'visits', 1n);
      const greeting = configGet('greeting') ?? 'Hello';
      respond(outparam, 200, `${greeting} You asked for ${path}; visit #${visits}.\n`);
    } catch (e) {
      // The host never puts its internals in a store error.
      const detail = e && e.payload !== undefined ? JSON.stringify(e.payload) : String(e);
      respond(outparam, 500, `store error: ${detail}\n`);
    }
  },
};
