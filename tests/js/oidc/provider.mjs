// An independent OpenID provider for upcoach's sign-in tests: oauth2-mock-server with
// an RS256 key, listening on 127.0.0.1 (port from argv[2], 0 for any). It prints one JSON
// line, {"issuer": "..."}, once it is ready, and runs until stdin closes or it is killed.
//
// Each token's user: sub "johndoe", email "johndoe@example.test", email_verified true,
// name "John Doe", changed for one sign-in by the browser adding
// `login_hint=<base64url JSON of claims>` to the authorization URL (a claim set to null
// is removed). The library already checks PKCE and echoes the nonce.
//
// UserInfo (GET /userinfo) answers only a bearer access token this server issued (401
// otherwise) with {"sub": <that sign-in's sub>} plus the hint's optional "userinfo"
// object: claims served there and not put in any token (null removes one, so
// {"sub": null} drops the sub; a "sub" there overrides it). The hint's optional
// "userinfo_status" makes the endpoint answer that HTTP status with an error instead,
// and its optional "token_error" makes the token endpoint refuse that sign-in's code
// with that OAuth error (400 {"error": ...}; 401 for "invalid_client", RFC 6749 §5.2).
import { OAuth2Server } from "oauth2-mock-server";

const port = Number(process.argv[2] ?? 0);
// With "trailing-slash" as argv[3], the issuer ends in "/" (discovery and tokens say
// so), as some providers' issuers do.
const trailingSlash = process.argv[3] === "trailing-slash";
const server = new OAuth2Server();
await server.issuer.keys.generate("RS256");

const defaults = {
  sub: "johndoe",
  email: "johndoe@example.test",
  email_verified: true,
  name: "John Doe",
};
// code -> { claims, userinfo, userinfoStatus } from the login_hint.
const claimsByCode = new Map();
// access token -> { status, body } for /userinfo.
const userinfoByToken = new Map();

server.service.on("beforeAuthorizeRedirect", (redirect, req) => {
  const hint = req.query.login_hint;
  const code = redirect.url.searchParams.get("code");
  if (typeof hint === "string" && code) {
    const parsed = JSON.parse(Buffer.from(hint, "base64url").toString("utf8"));
    const {
      userinfo,
      userinfo_status: userinfoStatus,
      token_error: tokenError,
      ...claims
    } = parsed;
    claimsByCode.set(code, { claims, userinfo, userinfoStatus, tokenError });
  }
});
server.service.on("beforeTokenSigning", (token, req) => {
  const extra = claimsByCode.get(req.body?.code)?.claims ?? {};
  for (const [name, value] of Object.entries({ ...defaults, ...extra })) {
    if (value === null) delete token.payload[name];
    else token.payload[name] = value;
  }
});
server.service.on("beforeResponse", (response, req) => {
  const hint = claimsByCode.get(req.body?.code);
  claimsByCode.delete(req.body?.code);
  if (typeof hint?.tokenError === "string") {
    response.statusCode = hint.tokenError === "invalid_client" ? 401 : 400;
    response.body = { error: hint.tokenError };
    return;
  }
  const accessToken = response.body?.access_token;
  if (response.statusCode !== 200 || typeof accessToken !== "string") return;
  const claims = { ...defaults, ...(hint?.claims ?? {}) };
  const body = { sub: claims.sub, ...(hint?.userinfo ?? {}) };
  for (const [name, value] of Object.entries(body)) {
    if (value === null || value === undefined) delete body[name];
  }
  const status = hint?.userinfoStatus ?? 200;
  userinfoByToken.set(accessToken, {
    status,
    body: status === 200 ? body : { error: "server_error" },
  });
});
server.service.on("beforeUserinfo", (response, req) => {
  const bearer = /^Bearer (\S+)$/i.exec(req.headers.authorization ?? "");
  const known = bearer ? userinfoByToken.get(bearer[1]) : undefined;
  if (!known) {
    response.statusCode = 401;
    response.body = { error: "invalid_token" };
    return;
  }
  response.statusCode = known.status;
  response.body = known.body;
});

await server.start(port, "127.0.0.1");
// The library names its issuer "localhost"; say the address it really listens on.
server.issuer.url = `http://127.0.0.1:${server.address().port}${trailingSlash ? "/" : ""}`;
process.stdout.write(JSON.stringify({ issuer: server.issuer.url }) + "\n");

const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.stdin.on("end", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
