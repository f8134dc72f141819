#!/usr/bin/env node
// Streams DEMO AAPL/MSFT trades from a tickgate server and prints them; refreshes its token
// and reconnects by itself.
//
//   TICKGATE_URL=http://127.0.0.1:8080 TICKGATE_CLIENT_ID=demo TICKGATE_CLIENT_SECRET=... \
//     node examples/stream.mjs [LIMIT]
//
// LIMIT (argument or env): exit 0 after that many trades. Without it: run until Ctrl-C.
import WebSocket from 'ws';
import { TickgateStream, clientCredentials } from 'tickgate-client';

const base = (process.env.TICKGATE_URL ?? 'http://127.0.0.1:8080').replace(/\/+$/, '');
const clientId = process.env.TICKGATE_CLIENT_ID ?? 'demo';
const clientSecret = process.env.TICKGATE_CLIENT_SECRET ?? '';
const limit = Number(process.argv[2] ?? process.env.LIMIT ?? 0);
if (!Number.isInteger(limit) || limit < 0) {
  console.error('LIMIT must be a whole number');
  process.exit(2);
}

const stream = new TickgateStream({
  url: `${base.replace(/^http/, 'ws')}/v1/stream`,
  // Called at every connect and token refresh: a new token each time.
  token: clientCredentials(`${base}/oauth2/token`, { clientId, clientSecret }),
  feed: 'DEMO',
  symbols: ['AAPL', 'MSFT'],
  WebSocket, // Node 20 has no global WebSocket; browsers leave this out
});

let trades = 0;
stream.addEventListener('subscribed', ({ detail: { msg } }) => {
  console.log(`subscribed to ${msg.feed} (epoch ${msg.epoch}): ${msg.instruments.map((i) => i.symbol).join(', ')}`);
});
stream.addEventListener('batch', ({ detail: { batch } }) => {
  const t = batch.trades;
  for (let i = 0; i < t.length; i++) {
    const symbol = stream.instrumentsById.get(t.instrumentId[i]);
    const side = t.side[i] === 1 ? 'buy ' : t.side[i] === 2 ? 'sell' : '?   ';
    const tag = t.flags[i] & 1 ? ' (snapshot)' : '';
    console.log(`${symbol} ${side} ${t.size[i]} @ ${t.price[i].toFixed(2)}  seq ${t.seq[i]}${tag}`);
    if (limit && ++trades >= limit) {
      stream.stop();
      return;
    }
  }
});
stream.addEventListener('refreshed', ({ detail }) => console.log(`token refreshed, valid until ${new Date(detail.exp * 1000).toISOString()}`));
stream.addEventListener('reconnecting', ({ detail }) => console.log(`reconnecting in ${detail.delayMs} ms: ${detail.reason}`));
stream.addEventListener('reconnected', () => console.log('reconnected'));
stream.addEventListener('gap', ({ detail: { msg } }) => console.log(`gap ${msg.symbol} ${msg.from}..${msg.to} (${msg.reason})`));
stream.addEventListener('error', ({ detail: { error } }) => console.error(`error: ${error.message}`));
stream.addEventListener('closed', ({ detail }) => {
  console.log(`closed: ${detail.code} ${detail.reason}`);
  process.exitCode = detail.code === 1000 && detail.reason === 'stopped' ? 0 : 1;
});
process.once('SIGINT', () => stream.stop());
// Piped into `head`: a closed stdout ends the run quietly.
process.stdout.on('error', (e) => {
  if (e.code === 'EPIPE') process.exit(0);
  throw e;
});
stream.start();
