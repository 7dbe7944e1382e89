// hello-js: a wasi:http 0.2 function in JavaScript (componentize-js,
// StarlingMonkey). `ignis up examples` builds it with
// scripts/componentize.sh (see examples/ignis.toml).
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';

export const incomingHandler = {
  handle(_request, outparam) {
    const response = new OutgoingResponse(new Fields([['content-type', new TextEncoder().encode('text/plain')]]));
    const body = response.body();
    ResponseOutparam.set(outparam, { tag: 'ok', val: response });
    const stream = body.write();
    stream.blockingWriteAndFlush(new TextEncoder().encode('Hello from Ignis, in JavaScript!\n'));
    stream[Symbol.dispose]();
    OutgoingBody.finish(body, undefined);
  },
};
