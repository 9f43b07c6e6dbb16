// An independent OpenID provider for upcoach's sign-in tests: oauth2-mock-server with
// an RS256 key, listening on 127.0.0.1 (port from argv[2], 0 for any). It prints one JSON
// line, {"issuer": "..."}, once it is ready, and runs until stdin closes or it is killed.
//
// Each token's user: sub "johndoe", email "johndoe@example.test", email_verified true,
// name "John Doe", changed for one sign-in by the browser adding
// `login_hint=<base64url JSON of claims>` to the authorization URL (a claim set to null
// is removed). The library already checks PKCE and echoes the nonce.
import { OAuth2Server } from "oauth2-mock-server";

const port = Number(process.argv[2] ?? 0);
const server = new OAuth2Server();
await server.issuer.keys.generate("RS256");

const defaults = {
  sub: "johndoe",
  email: "johndoe@example.test",
  email_verified: true,
  name: "John Doe",
};
const claimsByCode = new Map();

server.service.on("beforeAuthorizeRedirect", (redirect, req) => {
  const hint = req.query.login_hint;
  const code = redirect.url.searchParams.get("code");
  if (typeof hint === "string" && code) {
    claimsByCode.set(code, JSON.parse(Buffer.from(hint, "base64url").toString("utf8")));
  }
});
server.service.on("beforeTokenSigning", (token, req) => {
  const extra = claimsByCode.get(req.body?.code) ?? {};
  for (const [name, value] of Object.entries({ ...defaults, ...extra })) {
    if (value === null) delete token.payload[name];
    else token.payload[name] = value;
  }
});
server.service.on("beforeResponse", (_response, req) => {
  claimsByCode.delete(req.body?.code);
});

await server.start(port, "127.0.0.1");
// The library names its issuer "localhost"; say the address it really listens on.
server.issuer.url = `http://127.0.0.1:${server.address().port}`;
process.stdout.write(JSON.stringify({ issuer: server.issuer.url }) + "\n");

const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.stdin.on("end", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
