// bilik's code interpreter driven by the official `@e2b/code-interpreter` JS SDK.
import assert from 'node:assert/strict'
import { after, before, test } from 'node:test'

import { Sandbox } from '@e2b/code-interpreter'

import { OPTS } from './bilik.mjs'

let sbx

before(async () => {
  // The SDK's default template: code-interpreter-v1.
  sbx = await Sandbox.create(OPTS)
})

after(async () => {
  await sbx?.kill()
})

test('python: state, streamed output, errors as data', async () => {
  await sbx.runCode('x = 1')
  const execution = await sbx.runCode('x += 1; x')
  assert.equal(execution.text, '2')
  assert.ok(execution.executionCount > 0)

  const stdout = []
  const stderr = []
  const printed = await sbx.runCode(
    'import sys\nfor i in range(3):\n    print(i, flush=True)\nprint("oops", file=sys.stderr)',
    { onStdout: (out) => stdout.push(out.line), onStderr: (err) => stderr.push(err.line) },
  )
  assert.deepEqual(printed.logs.stdout, ['0\n', '1\n', '2\n'])
  assert.equal(stdout.join(''), '0\n1\n2\n')
  assert.deepEqual(stderr, ['oops\n'])

  const failed = await sbx.runCode('1 / 0')
  assert.equal(failed.error.name, 'ZeroDivisionError')
  assert.equal((await sbx.runCode('x')).text, '2')
})

test('python: a matplotlib chart comes back as a PNG and as chart data', async () => {
  const plot = await sbx.runCode(
    "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\n" +
      'plt.show()',
  )
  const figure = plot.results.find((r) => r.png)
  assert.ok(figure, JSON.stringify(plot))
  assert.ok(Buffer.from(figure.png, 'base64').subarray(1, 4).equals(Buffer.from('PNG')))
  assert.equal(figure.chart.type, 'line')
  assert.equal(figure.chart.title, 'squares')
  assert.deepEqual(
    figure.chart.elements[0].points.map(([x, y]) => [Number(x), Number(y)]),
    [
      [1, 1],
      [2, 4],
      [3, 9],
    ],
  )

  const bars = await sbx.runCode(
    "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.title('bars')\nplt.show()",
  )
  const bar = bars.results.find((r) => r.chart)
  assert.equal(bar.chart.type, 'bar')
  assert.deepEqual(
    bar.chart.elements.map((e) => [e.label, Number(e.value)]),
    [
      ['a', 3],
      ['b', 5],
    ],
  )
})

test('javascript keeps its own state', async () => {
  await sbx.runCode('const greeting = "hello"', { language: 'javascript' })
  const execution = await sbx.runCode('greeting + " from js"', { language: 'javascript' })
  assert.equal(execution.text, 'hello from js')
  const logged = await sbx.runCode('console.log(6 * 7)', { language: 'js' })
  assert.deepEqual(logged.logs.stdout, ['42\n'])
})

test('bash sees envs for one execution only, and files written by python', async () => {
  await sbx.runCode("open('/home/user/from_python.txt', 'w').write('written by python')")
  const shell = await sbx.runCode('cat /home/user/from_python.txt; echo; echo "$ONLY"', {
    language: 'bash',
    envs: { ONLY: 'for bash' },
  })
  assert.equal(shell.logs.stdout.join(''), 'written by python\nfor bash\n')
  const after = await sbx.runCode('echo "[$ONLY]"', { language: 'bash' })
  assert.equal(after.logs.stdout.join(''), '[]\n')
})

test('contexts: a context of its own, with its cwd', async () => {
  const context = await sbx.createCodeContext({ cwd: '/tmp', language: 'python' })
  await sbx.runCode('y = "in the context"', { context })
  assert.equal((await sbx.runCode('y', { context })).text, 'in the context')
  assert.equal((await sbx.runCode('import os; os.getcwd()', { context })).text, '/tmp')
  assert.equal((await sbx.runCode("'y' in globals()")).text, 'False')
  await sbx.removeCodeContext(context)
})
