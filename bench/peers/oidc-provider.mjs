// panva/oidc-provider with its in-memory adapter and one confidential client for
// client_credentials, issuing EdDSA at+jwt access tokens as keygate does: the peer of
// bench/compare.sh. Usage: node oidc-provider.mjs PORT CLIENT_ID CLIENT_SECRET
import Provider from 'oidc-provider';
import { generateKeyPairSync } from 'node:crypto';

const [port, clientId, clientSecret] = process.argv.slice(2);
const { privateKey } = generateKeyPairSync('ed25519');
const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'k1', alg: 'EdDSA', use: 'sig' };
const resource = 'https://api.example';
const provider = new Provider(`http://127.0.0.1:${port}`, {
  jwks: { keys: [jwk] },
  clients: [{
    client_id: clientId, client_secret: clientSecret, grant_types: ['client_credentials'],
    redirect_uris: [], response_types: [], scope: 'docs:read', id_token_signed_response_alg: 'EdDSA',
  }],
  scopes: ['docs:read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      getResourceServerInfo: () => ({
        scope: 'docs:read', audience: resource, accessTokenFormat: 'jwt', accessTokenTTL: 3600,
        jwt: { sign: { alg: 'EdDSA' } },
      }),
    },
  },
});
provider.listen(Number(port), '127.0.0.1');
