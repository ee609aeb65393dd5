// Calls mindstream.recall.v1.RecallService/Recall from Node through recall.proto alone (no
// generated code) and prints the response, or the error's code and details, as one JSON line.
//   node recall.js HOST:PORT PROTO_ROOT '{"user_id": "u1", "n": 10}'
// Exit status: 0 on OK, 1 on a gRPC error, 2 on bad usage.
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [target, protoRoot, requestJson] = process.argv.slice(2);
if (!requestJson) {
  console.error('usage: node recall.js HOST:PORT PROTO_ROOT REQUEST_JSON');
  process.exit(2);
}
const definition = protoLoader.loadSync('mindstream/recall/v1/recall.proto', {
  includeDirs: [protoRoot], keepCase: true, enums: String, longs: Number, defaults: true,
});
const v1 = grpc.loadPackageDefinition(definition).mindstream.recall.v1;
const client = new v1.RecallService(target, grpc.credentials.createInsecure());
client.Recall(JSON.parse(requestJson), { deadline: Date.now() + 10000 }, (error, response) => {
  client.close();
  if (error) {
    console.log(JSON.stringify({ code: error.code, details: error.details }));
    process.exit(1);
  }
  console.log(JSON.stringify(response));
});
