// A template built with the official `e2b` JS SDK's `Template` builder, and a sandbox from it.
import assert from 'node:assert/strict'
import { randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { after, test } from 'node:test'

import { Sandbox, Template, waitForPort } from 'e2b'

import { API_URL, OPTS } from './bilik.mjs'

const APP = `
import http.server, os
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write((os.environ["GREETING"] + " " + open("/app/data.txt").read()).encode())
http.server.HTTPServer(("0.0.0.0", 8000), Hello).serve_forever()
`

const context = mkdtempSync(join(tmpdir(), 'bilik-js-template-'))
const built = []

after(async () => {
  rmSync(context, { recursive: true, force: true })
  // Templates share the test layer store: drop them, so their layers can be collected.
  for (const templateId of built) {
    await fetch(`${API_URL}/templates/${templateId}`, {
      method: 'DELETE',
      headers: { 'X-API-Key': process.env.E2B_API_KEY },
    })
  }
})

test('Template.build, then a sandbox from the template', async () => {
  // New content each run: layers are content-addressed and outlive a test session.
  const word = `world-${randomUUID().slice(0, 8)}`
  writeFileSync(join(context, 'app.py'), APP)
  writeFileSync(join(context, 'data.txt'), word)
  const template = Template({ fileContextPath: context })
    .fromBaseImage()
    .copy(['app.py', 'data.txt'], '/app/')
    .runCmd('echo built > /home/user/marker')
    .setEnvs({ GREETING: 'hello' })
    .setWorkdir('/app')
    .setStartCmd('python3 /app/app.py', waitForPort(8000))

  const logs = []
  const info = await Template.build(template, 'js-web', {
    cpuCount: 1,
    memoryMB: 512,
    onBuildLogs: (entry) => logs.push(entry.message),
  })
  built.push(info.templateId)
  assert.equal(info.name, 'js-web')
  assert.ok(logs.some((line) => line.includes('echo built')), logs.join('\n'))
  assert.equal(await Template.exists('js-web'), true)

  const sbx = await Sandbox.create('js-web', OPTS)
  try {
    assert.equal(await sbx.files.read('/home/user/marker'), 'built\n')
    const shell = await sbx.commands.run('echo "$GREETING"; pwd')
    assert.equal(shell.stdout, 'hello\n/app\n')
    // The start command's server is up once create returns.
    const page = await sbx.commands.run('curl -s localhost:8000')
    assert.equal(page.stdout, `hello ${word}`)
  } finally {
    await sbx.kill()
  }
})
