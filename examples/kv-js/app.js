// kv-js: key-value and config from JavaScript (componentize-js).
//
//   GET /kv-js/visit            counts a visit (atomic increment) and greets
//                               with the `greeting` config value
//   PUT /kv-js/set?key=K&value=V
//   GET /kv-js/get?key=K        the value, or 404
//
// A store error answers 500 with the error the host returned (the host
// never puts its internals in it).
import { Fields, OutgoingBody, OutgoingResponse, ResponseOutparam } from 'wasi:http/types@0.2.12';
import { open } from 'wasi:keyvalue/store@0.2.0-draft2';
import { increment } from 'wasi:keyvalue/atomics@0.2.0-draft2';
import { get as configGet } from 'wasi:config/store@0.2.0-rc.1';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

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

function query(pathWithQuery) {
  const params = new Map();
  const q = pathWithQuery.split('?')[1] || '';
  for (const pair of q.split('&')) {
    const [k, v] = pair.split('=');
    if (k) params.set(decodeURIComponent(k), decodeURIComponent((v || '').replace(/\+/g, ' ')));
  }
  return params;
}

function describe(e) {
  return e && e.payload !== undefined ? JSON.stringify(e.payload) : String(e);
}

export const incomingHandler = {
  handle(request, outparam) {
    const path = request.pathWithQuery() || '/';
    const route = path.split('?')[0].split('/').pop();
    const params = query(path);
    try {
      const bucket = open('default');
      if (route === 'visit') {
        const n = increment(bucket, 'kv-js-visits', 1n);
        const greeting = configGet('greeting') ?? 'Hello';
        respond(outparam, 200, `${greeting} You are visitor #${n} (JavaScript).\n`);
      } else if (route === 'set') {
        bucket.set(params.get('key'), encoder.encode(params.get('value') ?? ''));
        respond(outparam, 200, 'stored\n');
      } else if (route === 'get') {
        const value = bucket.get(params.get('key'));
        if (value === undefined) {
          respond(outparam, 404, 'no such key\n');
        } else {
          respond(outparam, 200, decoder.decode(value));
        }
      } else {
        respond(outparam, 404, 'unknown kv-js route\n');
      }
    } catch (e) {
      respond(outparam, 500, `store error: ${describe(e)}\n`);
    }
  },
};
