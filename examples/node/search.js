#!/usr/bin/env node
// lookalike from Node.js: creates a collection, upserts a few vectors, searches, and prints the neighbours' ids and
// distances. Built from the protos alone (protos/lookalike.proto, protos/common.proto); docs/CLIENTS.md explains it.
//
//   cd examples/node && npm install && node search.js [HOST:PORT] [COLLECTION]
//
// Defaults: localhost:50051 (what `lookalike serve` listens on) and the collection "node-demo". LOOKALIKE_TLS_CA
// (a CA file: TLS) and LOOKALIKE_TOKEN (a bearer token) are used when set.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The include path is the repository root, not protos/: lookalike.proto imports "protos/common.proto", which
// includeDirs [<repository>/protos] would look for as protos/protos/common.proto (ENOENT).
const ROOT = process.env.LOOKALIKE_ROOT || path.resolve(__dirname, '..', '..');
const definition = protoLoader.loadSync('protos/lookalike.proto', {
  includeDirs: [ROOT],
  keepCase: true, // field names as in the proto (include_payloads), not camelCase
  longs: String, // uint64 fields (count, epoch, ...) as decimal strings; without this they are Long objects
  enums: String, // enum values by name ("L2", "NOT_NEEDED")
  defaults: true, // fields left at their zero value are present in responses (proto3 does not send them)
});
const { Lookalike } = grpc.loadPackageDefinition(definition).lookalike.v1;

// Vectors travel packed: rows * dim little-endian float32 in one bytes field (never repeated float). A
// Float32Array holds the machine's byte order, which is little-endian on x86 and ARM; on a big-endian machine fill
// the Buffer with buf.writeFloatLE instead. Binary codes (hamming collections): a Buffer of rows * dim bytes, with
// dim = bits / 8 and dtype 'UINT8'.
function packFloat32(rows) {
  if (os.endianness() !== 'LE') throw new Error('packFloat32 assumes a little-endian machine');
  const dim = rows[0].length;
  const flat = new Float32Array(rows.length * dim);
  rows.forEach((row, i) => flat.set(row, i * dim));
  return { data: Buffer.from(flat.buffer, flat.byteOffset, flat.byteLength), rows: rows.length, dim,
           dtype: 'FLOAT32' };
}

// One unary call as a promise, with a deadline (every call should have one).
function call(client, method, request, metadata, seconds = 30) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + seconds * 1000 },
                   (err, response) => (err ? reject(err) : resolve(response)));
  });
}

const ITEMS = {
  red: [1.0, 0.0, 0.0, 0.0],
  orange: [0.8, 0.5, 0.0, 0.0],
  yellow: [0.6, 0.9, 0.0, 0.0],
  green: [0.0, 1.0, 0.2, 0.0],
  blue: [0.0, 0.1, 1.0, 0.0],
  violet: [0.5, 0.0, 0.8, 0.1],
};
const QUERY = [0.9, 0.3, 0.0, 0.05];

async function main() {
  const target = process.argv[2] || 'localhost:50051';
  const name = process.argv[3] || 'node-demo';
  const credentials = process.env.LOOKALIKE_TLS_CA
    ? grpc.credentials.createSsl(fs.readFileSync(process.env.LOOKALIKE_TLS_CA))
    : grpc.credentials.createInsecure();
  const metadata = new grpc.Metadata();
  if (process.env.LOOKALIKE_TOKEN) metadata.set('authorization', `Bearer ${process.env.LOOKALIKE_TOKEN}`);
  // Answers can be up to 64 MiB (the server's limit); grpc-js refuses more than 4 MiB unless told otherwise.
  const client = new Lookalike(target, credentials, { 'grpc.max_receive_message_length': 64 << 20,
                                                      'grpc.max_send_message_length': 64 << 20 });
  try {
    try {
      await call(client, 'CreateCollection', { spec: { name, dim: 4, metric: 'L2', index: 'Flat', buckets: 16 } },
                 metadata);
      console.log(`created collection ${name}`);
    } catch (err) {
      if (err.code !== grpc.status.ALREADY_EXISTS) throw err;
      console.log(`collection ${name} exists: upserting into it`); // Upsert replaces items with the same id
    }
    const ids = Object.keys(ITEMS);
    const written = await call(client, 'Upsert', {
      collection: name, ids, vectors: packFloat32(Object.values(ITEMS)),
      payloads: ids.map((id) => ({ fields: { uri: `img/${id}.jpg` } })),
    }, metadata);
    console.log(`upserted ${written.count} items`);
    const info = await call(client, 'DescribeCollection', { collection: name }, metadata);
    console.log(`collection ${info.spec.name}: ${info.count} items, dim ${info.spec.dim}, ${info.spec.metric}, ` +
                `epoch ${info.epoch}`);
    const found = await call(client, 'Search', { collection: name, queries: packFloat32([QUERY]), k: 3,
                                                 include_payloads: true }, metadata);
    // L2: squared Euclidean distance, smaller is better; the neighbours come best first.
    console.log(`query ${JSON.stringify(QUERY)} (coverage ${found.coverage}):`);
    const best = found.results[0];
    best.ids.forEach((id, i) => console.log(`${id}\t${best.distances[i].toFixed(6)}\t${best.payloads[i].fields.uri}`));
  } finally {
    client.close();
  }
}

main().catch((err) => {
  // gRPC errors carry a status code and the server's sentence
  const code = err.code !== undefined ? `${grpc.status[err.code]}: ` : '';
  console.error(`error: ${code}${err.details || err.message}`);
  process.exit(1);
});
