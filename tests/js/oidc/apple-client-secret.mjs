// An independent check of the client secrets upcoach sends to Sign in with Apple's token
// endpoint, with the `jose` library (the one oauth2-mock-server uses), against Apple's
// documented rules: ES256, a `kid` header naming the key, iss = the team id, aud =
// https://appleid.apple.com, sub = the client id, iat present and exp at most
// 15,777,000 s (six months) after it.
//
// Reads one JSON object on stdin: {"secret", "publicKey" (SPKI PEM), "teamId", "keyId",
// "clientId"}; prints one JSON line: {"ok": true, "lifetime": exp - iat} or
// {"ok": false, "error": "..."}.
import { importSPKI, jwtVerify, decodeProtectedHeader } from "jose";

const APPLE_AUDIENCE = "https://appleid.apple.com";
const MAX_LIFETIME = 15_777_000;

let input = "";
for await (const chunk of process.stdin) input += chunk;
const { secret, publicKey, teamId, keyId, clientId } = JSON.parse(input);

try {
  const header = decodeProtectedHeader(secret);
  if (header.alg !== "ES256") throw new Error(`alg ${header.alg}`);
  if (header.kid !== keyId) throw new Error(`kid ${header.kid}`);
  const key = await importSPKI(publicKey, "ES256");
  const { payload } = await jwtVerify(secret, key, {
    algorithms: ["ES256"],
    issuer: teamId,
    audience: APPLE_AUDIENCE,
    subject: clientId,
    requiredClaims: ["iat", "exp"],
  });
  const lifetime = payload.exp - payload.iat;
  if (!(lifetime > 0 && lifetime <= MAX_LIFETIME)) throw new Error(`lifetime ${lifetime}`);
  process.stdout.write(JSON.stringify({ ok: true, lifetime }) + "\n");
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e.message ?? e) }) + "\n");
}
