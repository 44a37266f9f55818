// What every JS test shares: the server it talks to, read from the environment that
// tests/test_js_sdk.py sets (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY, E2B_DOMAIN), which the
// official SDKs read themselves. Without them the SDKs would aim at E2B's cloud: refuse to run.
import assert from 'node:assert/strict'

for (const name of ['E2B_API_URL', 'E2B_SANDBOX_URL']) {
  const url = new URL(process.env[name] ?? 'unset:')
  assert.ok(
    url.protocol === 'http:' && ['127.0.0.1', 'localhost', '[::1]'].includes(url.hostname),
    `${name} must name a local bilik server, not ${url.href}`,
  )
}
assert.ok(process.env.E2B_API_KEY, 'E2B_API_KEY must be set')

export const API_URL = process.env.E2B_API_URL

/** Sandbox options for a test's sandboxes; `metadata.suite` lets a test list only its own. */
export const OPTS = { timeoutMs: 120_000, metadata: { suite: 'js' } }

/** Resolves once `predicate()` holds, polling, or fails after `timeoutMs`. */
export async function eventually(predicate, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs
  while (!(await predicate())) {
    assert.ok(Date.now() < deadline, `not true within ${timeoutMs} ms: ${predicate}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}
