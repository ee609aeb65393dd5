// Calls mindstream.recall.v1.RecallService/Recall from Node through recall.proto alone (no
// generated code) and prints the response, or the error's code and details, as one JSON line.
//   recall_service/clients/node/install.sh        # once: the pinned packages into var/node
//   node recall_service/clients/node/recall.js HOST:PORT recall_service/proto '{"user_id": "u1", "n": 10}' [TIMEOUT_S]
// TIMEOUT_S is the call's deadline in seconds, connecting included (default 2, as `python -m
// recall_service recall --timeout`).
// TLS and the bearer token come from the variables the project's configuration reads, as the
// Python clients read them (recall_service/channel.py): MINDSTREAM_RECALL__TLS_CAFILE (the CA
// certificate the server's is verified with, PEM), else MINDSTREAM_RECALL__TLS_CERTFILE (the
// server's own certificate: right for a self-signed one); either turns TLS on.
// MINDSTREAM_RECALL__AUTH_TOKEN is sent as `authorization: Bearer <token>`.
// Exit status: 0 on OK, 1 on a gRPC error, 2 on bad usage (said in one line on stderr).
const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');

// The packages install.sh put into var/node, unless NODE_PATH (or a global install) provides them.
const fromVar = createRequire(path.join(__dirname, '..', '..', '..', 'var', 'node', 'package.json'));
function load(name) {
  try {
    return require(name);
  } catch (error) {
    if (error.code !== 'MODULE_NOT_FOUND') throw error;
    return fromVar(name);
  }
}
const grpc = load('@grpc/grpc-js');
const protoLoader = load('@grpc/proto-loader');

function usageError(message) {
  console.error(`error: ${message}`);
  process.exit(2);
}

const [target, protoRoot, requestJson, timeoutArg = '2', ...extra] = process.argv.slice(2);
if (!requestJson || extra.length) {
  console.error('usage: node recall.js HOST:PORT PROTO_ROOT REQUEST_JSON [TIMEOUT_S]  (run install.sh once first)');
  process.exit(2);
}
const timeoutS = Number(timeoutArg);
if (!(timeoutS > 0 && Number.isFinite(timeoutS))) usageError(`TIMEOUT_S must be a number of seconds above 0, not ${timeoutArg}`);
let request;
try {
  request = JSON.parse(requestJson);
} catch (error) {
  usageError(`REQUEST_JSON is not JSON (${error.message}): e.g. '{"user_id": "u1", "n": 10}'`);
}
if (typeof request !== 'object' || request === null || Array.isArray(request)) {
  usageError(`REQUEST_JSON must be a JSON object of RecallRequest fields, e.g. '{"user_id": "u1", "n": 10}'`);
}
const definition = protoLoader.loadSync('mindstream/recall/v1/recall.proto', {
  includeDirs: [protoRoot], keepCase: true, enums: String, longs: Number, defaults: true,
});
// protobufjs builds the message leniently (an unknown field is dropped, an unknown enum name becomes
// 0, n: 4294967306 becomes 10): each field is checked against recall.proto's RecallRequest first, so
// a typo is an error rather than another request.
const PACKAGE = 'mindstream.recall.v1';
const fields = new Map(definition[`${PACKAGE}.RecallRequest`].type.field.map((f) => [f.name, f]));
for (const [name, value] of Object.entries(request)) {
  const field = fields.get(name);
  if (!field) usageError(`REQUEST_JSON: ${name} is not a RecallRequest field (${[...fields.keys()].join(', ')})`);
  const repeated = field.label === 'LABEL_REPEATED';
  if (repeated && !Array.isArray(value)) usageError(`REQUEST_JSON: ${name} must be a list`);
  for (const one of repeated ? value : [value]) {
    if (field.type === 'TYPE_STRING' && typeof one !== 'string') usageError(`REQUEST_JSON: ${name} must be ${repeated ? 'a list of strings' : 'a string'}`);
    if (field.type === 'TYPE_INT32' && !(Number.isInteger(one) && one >= -(2 ** 31) && one < 2 ** 31)) usageError(`REQUEST_JSON: ${name} must be an integer (int32)`);
    if (field.type === 'TYPE_ENUM') {
      const names = definition[`${PACKAGE}.${field.typeName}`].type.value.map((v) => v.name);
      if (!names.includes(one)) usageError(`REQUEST_JSON: ${name} must be one of ${names.join(', ')}`);
    }
  }
}
const v1 = grpc.loadPackageDefinition(definition).mindstream.recall.v1;
const trusted = process.env.MINDSTREAM_RECALL__TLS_CAFILE || process.env.MINDSTREAM_RECALL__TLS_CERTFILE;
let credentials = grpc.credentials.createInsecure();
if (trusted) {
  let roots;
  try {
    roots = fs.readFileSync(trusted);
  } catch (error) {
    usageError(`cannot read ${trusted} (${error.code || error.message}): set MINDSTREAM_RECALL__TLS_CAFILE to the CA certificate (PEM) of the recall server`);
  }
  credentials = grpc.credentials.createSsl(roots);
}
const metadata = new grpc.Metadata();
if (process.env.MINDSTREAM_RECALL__AUTH_TOKEN) {
  metadata.add('authorization', `Bearer ${process.env.MINDSTREAM_RECALL__AUTH_TOKEN}`);
}
const client = new v1.RecallService(target, credentials);
client.Recall(request, metadata, { deadline: Date.now() + timeoutS * 1000 }, (error, response) => {
  client.close();
  if (error) {
    console.log(JSON.stringify({ code: error.code, details: error.details }));
    process.exit(1);
  }
  console.log(JSON.stringify(response));
});
