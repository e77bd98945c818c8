// The benchmark's Node app: the classic hello-world server, unmodified except that it
// takes an inherited listening socket (fd 3) when LISTEN_FDS is set, as Node documents
// for socket activation. Otherwise it listens on $PORT (default 3000).
//   GET /            -> "hello"
//   GET /slow?ms=N   -> "hello" after N ms (default 200), so requests are in flight
// It dies at once on SIGINT/SIGTERM (Node's default), like most apps in the wild,
// unless HELLO_GRACEFUL=1: then it stops accepting, closes idle keep-alive connections
// and exits when its requests in flight are done.
'use strict';
const http = require('http');

const server = http.createServer((req, res) => {
  if (req.url.startsWith('/slow')) {
    const m = /[?&]ms=(\d+)/.exec(req.url);
    const ms = m ? Number(m[1]) : 200;
    setTimeout(() => res.end('hello'), ms);
    return;
  }
  res.end('hello');
});

if (process.env.LISTEN_FDS && Number(process.env.LISTEN_FDS) >= 1) {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT || 3000), process.env.HOST || '127.0.0.1');
}

server.on('listening', () => {
  if (typeof process.send === 'function') process.send('ready'); // PM2 wait_ready / clusterd ipc
});

if (process.env.HELLO_GRACEFUL === '1') {
  const stop = () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}
