// bilik driven by the official `e2b` JS SDK: the lifecycle, files, commands and a PTY.
import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { CommandExitError, FilesystemEventType, Sandbox } from 'e2b'

import { OPTS, eventually } from './bilik.mjs'

test('lifecycle: create, getInfo, list, connect, setTimeout, kill', async () => {
  const metadata = { suite: 'js', case: 'lifecycle' }
  const sbx = await Sandbox.create('base', { timeoutMs: 60_000, metadata })
  try {
    const info = await sbx.getInfo()
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'base')
    assert.equal(info.state, 'running')
    assert.deepEqual(info.metadata, metadata)
    const lifetime = info.endAt.getTime() - info.startedAt.getTime()
    assert.ok(lifetime > 55_000 && lifetime <= 61_000, `lifetime ${lifetime} ms`)

    const other = await Sandbox.create('base', { timeoutMs: 60_000, metadata: { ...metadata, n: '2' } })
    try {
      const listed = await Sandbox.list({ query: { metadata: { case: 'lifecycle' } } }).nextItems()
      assert.deepEqual(
        listed.map((s) => s.sandboxId).sort(),
        [sbx.sandboxId, other.sandboxId].sort(),
      )
      const onePerPage = Sandbox.list({ query: { metadata: { case: 'lifecycle' } }, limit: 1 })
      const seen = []
      while (onePerPage.hasNext) seen.push(...(await onePerPage.nextItems()).map((s) => s.sandboxId))
      assert.deepEqual(seen.sort(), [sbx.sandboxId, other.sandboxId].sort())
    } finally {
      assert.equal(await Sandbox.kill(other.sandboxId), true)
    }

    const again = await Sandbox.connect(sbx.sandboxId)
    assert.equal(again.sandboxId, sbx.sandboxId)
    assert.equal(await again.isRunning(), true)
    assert.equal((await again.commands.run('echo connected')).stdout, 'connected\n')

    await sbx.setTimeout(20_000)
    const shorter = await sbx.getInfo()
    assert.ok(shorter.endAt.getTime() - Date.now() <= 21_000, `ends at ${shorter.endAt}`)
  } finally {
    assert.equal(await sbx.kill(), true)
  }
  assert.equal(await sbx.isRunning(), false)
  assert.equal(await Sandbox.kill(sbx.sandboxId), false)
  await assert.rejects(Sandbox.connect(sbx.sandboxId))
})

describe('in one sandbox', () => {
  let sbx

  before(async () => {
    sbx = await Sandbox.create('base', OPTS)
  })

  after(async () => {
    await sbx?.kill()
  })

  test('files: write, read, list, exists, rename, remove', async () => {
    const written = await sbx.files.write('/home/user/js/hello.txt', 'héllo')
    assert.equal(written.path, '/home/user/js/hello.txt')
    assert.equal(await sbx.files.read('/home/user/js/hello.txt'), 'héllo')
    // Relative paths are the user's home.
    assert.equal(await sbx.files.read('js/hello.txt'), 'héllo')

    const blob = Uint8Array.from({ length: 64 * 1024 }, (_, i) => (i * 7) % 256)
    await sbx.files.write('/tmp/blob.bin', blob.buffer)
    assert.deepEqual(await sbx.files.read('/tmp/blob.bin', { format: 'bytes' }), blob)
    const stream = await sbx.files.read('/tmp/blob.bin', { format: 'stream' })
    const parts = []
    for await (const part of stream) parts.push(part)
    assert.deepEqual(new Uint8Array(Buffer.concat(parts)), blob)

    const many = await sbx.files.write([
      { path: '/home/user/js/a.txt', data: 'a' },
      { path: '/home/user/js/sub/b.txt', data: 'b' },
    ])
    assert.deepEqual(
      many.map((w) => w.path),
      ['/home/user/js/a.txt', '/home/user/js/sub/b.txt'],
    )
    const entries = await sbx.files.list('/home/user/js')
    assert.deepEqual(entries.map((e) => `${e.name}:${e.type}`).sort(), [
      'a.txt:file',
      'hello.txt:file',
      'sub:dir',
    ])
    const deep = await sbx.files.list('/home/user/js', { depth: 2 })
    assert.ok(deep.some((e) => e.path === '/home/user/js/sub/b.txt'), JSON.stringify(deep))

    assert.equal(await sbx.files.exists('/home/user/js/a.txt'), true)
    await sbx.files.rename('/home/user/js/a.txt', '/home/user/js/c.txt')
    assert.equal(await sbx.files.read('/home/user/js/c.txt'), 'a')
    await sbx.files.remove('/home/user/js/c.txt')
    assert.equal(await sbx.files.exists('/home/user/js/c.txt'), false)
    await sbx.files.remove('/home/user/js/sub')
    assert.equal(await sbx.files.exists('/home/user/js/sub/b.txt'), false)
    assert.equal(await sbx.files.makeDir('/home/user/js/made'), true)
    assert.equal((await sbx.files.getInfo('/home/user/js/made')).type, 'dir')
  })

  test('files: watchDir reports what changes', async () => {
    await sbx.files.makeDir('/home/user/watched')
    const events = []
    const watcher = await sbx.files.watchDir('/home/user/watched', (event) => events.push(event))
    try {
      await sbx.files.write('/home/user/watched/new.txt', 'x')
      await sbx.commands.run('rm /home/user/watched/new.txt')
      await eventually(() =>
        events.some((e) => e.name === 'new.txt' && e.type === FilesystemEventType.REMOVE),
      )
      assert.ok(
        events.some((e) => e.name === 'new.txt' && e.type === FilesystemEventType.CREATE),
        JSON.stringify(events),
      )
    } finally {
      await watcher.stop()
    }
  })

  test('commands: output streams to callbacks; exit codes, envs, cwd and users', async () => {
    const stdout = []
    const stderr = []
    const stamps = []
    const result = await sbx.commands.run(
      'for i in 1 2 3; do echo $i; sleep 0.2; done; echo oops >&2',
      {
        onStdout: (data) => {
          stdout.push(data)
          stamps.push(Date.now())
        },
        onStderr: (data) => stderr.push(data),
      },
    )
    assert.equal(result.exitCode, 0)
    assert.equal(result.stdout, '1\n2\n3\n')
    assert.equal(stdout.join(''), '1\n2\n3\n')
    assert.equal(stderr.join(''), 'oops\n')
    // Streamed as it came, not all at the end.
    assert.ok(stamps.at(-1) - stamps[0] >= 300, `stdout came at ${stamps}`)

    const env = await sbx.commands.run('echo "$FOO"; pwd; whoami', {
      envs: { FOO: 'bar' },
      cwd: '/tmp',
      user: 'root',
    })
    assert.equal(env.stdout, 'bar\n/tmp\nroot\n')
    assert.equal((await sbx.commands.run('whoami')).stdout, 'user\n')

    await assert.rejects(sbx.commands.run('echo no >&2; exit 3'), (error) => {
      assert.ok(error instanceof CommandExitError)
      assert.equal(error.exitCode, 3)
      assert.equal(error.stderr, 'no\n')
      return true
    })
  })

  test('commands: background, wait, stdin, list and kill', async () => {
    const lines = []
    const job = await sbx.commands.run('sleep 0.3; echo done', {
      background: true,
      onStdout: (data) => lines.push(data),
    })
    assert.ok(job.pid > 0)
    const finished = await job.wait()
    assert.equal(finished.stdout, 'done\n')
    assert.deepEqual(lines, ['done\n'])

    const cat = await sbx.commands.run('cat', { background: true, stdin: true })
    await sbx.commands.sendStdin(cat.pid, 'fed in\n')
    await sbx.commands.closeStdin(cat.pid)
    assert.equal((await cat.wait()).stdout, 'fed in\n')

    const sleeper = await sbx.commands.run('sleep 600', { background: true, timeoutMs: 0 })
    assert.ok((await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
    assert.equal(await sleeper.kill(), true)
    await assert.rejects(sleeper.wait(), CommandExitError)
    assert.ok(!(await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
    assert.equal(await sbx.commands.kill(sleeper.pid), false)
  })

  test('pty: output, input, resize and kill', async () => {
    const decoder = new TextDecoder()
    let screen = ''
    const terminal = await sbx.pty.create({
      cols: 80,
      rows: 24,
      onData: (data) => {
        screen += decoder.decode(data, { stream: true })
      },
    })
    await sbx.pty.resize(terminal.pid, { cols: 100, rows: 30 })
    await sbx.pty.sendInput(terminal.pid, new TextEncoder().encode('stty size; echo $((6*7))\n'))
    await eventually(() => screen.includes('30 100') && screen.includes('42'))
    assert.equal(await sbx.pty.kill(terminal.pid), true)
    await assert.rejects(terminal.wait())
  })
})
