// Preloaded (`node --require`) into the cache test suite's client, from the suite's own
// directory: every request the suite makes goes to the forward proxy at KALMAR_PROXY as an
// absolute-form request (`GET http://origin/... HTTP/1.1`), never as a CONNECT tunnel and
// never directly to the origin. Nothing in the suite is edited.
//
// The suite makes requests three ways, all covered here:
// * its test requests and its own `PUT /config` / `GET /state` calls use the global
//   `fetch`: replaced by undici's `fetch` (Node's built-in one ignores HTTP_PROXY), whose
//   global dispatcher is a ProxyAgent with `proxyTunnel: false` (by default undici tunnels
//   even plain-http URLs through CONNECT);
// * the interim-response tests build `new undici.Agent()` and pass it as `dispatcher`:
//   undici's `Agent` export is replaced, before the suite imports undici, by a ProxyAgent to
//   the same proxy (their interceptor composes onto it as onto any dispatcher).
'use strict'

const proxy = process.env.KALMAR_PROXY
if (!proxy || !/^http:\/\/[^/]+\/?$/.test(proxy)) {
  throw new Error(`KALMAR_PROXY must be the proxy as http://HOST:PORT, not ${JSON.stringify(proxy)}`)
}

// The suite's own copy of undici, the one its `import('undici')` resolves to.
const undici = require(require.resolve('undici', { paths: [process.cwd()] }))

class ProxiedAgent extends undici.ProxyAgent {
  constructor (opts = {}) {
    super({ ...opts, uri: proxy, proxyTunnel: false })
  }
}

undici.install()
undici.setGlobalDispatcher(new ProxiedAgent())
undici.Agent = ProxiedAgent
