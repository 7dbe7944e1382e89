// The JavaScript hello as a Cloudflare Worker, for workerd: the same
// response as examples/hello-js, the peer of the JavaScript hello
// benchmark (scripts/bench-languages.sh).
export default {
  async fetch() {
    return new Response("Hello from Ignis, in JavaScript!\n", {
      headers: { "content-type": "text/plain" },
    });
  },
};
