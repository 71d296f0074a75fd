// Preloaded (`node --require`) into the cache test suite's origin server: its
// `server.listen(port)` binds every interface; this makes a listen on a bare port bind
// 127.0.0.1 only, so the origin is reachable from this machine alone.
'use strict'

const net = require('node:net')
const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if (args.length >= 1 && (typeof args[0] === 'number' || /^\d+$/.test(String(args[0])))) {
    const rest = args.slice(1).filter(a => typeof a === 'function')
    return listen.call(this, Number(args[0]), '127.0.0.1', ...rest)
  }
  return listen.apply(this, args)
}
