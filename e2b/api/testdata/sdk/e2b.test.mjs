// The official E2B JavaScript SDK (npm e2b, pinned in package-lock.json),
// unchanged, against a firkin worker started the README's way: embedded
// NATS, the default driver, a temporary state directory, --e2b-listen and
// the proxy on free loopback ports. The SDK is pointed at it with
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY only. It drives both the
// control API (create, list, timeout, pause, connect, fork, snapshots) and
// the sandbox API the worker serves at port 49983 through the proxy
// (commands, files, watches, PTYs, the envd access token), and prints the
// latency of commands.run('echo hi') against firkin's own NATS exec.
//
//	make e2b-test          (from the repository root; builds bin/ first)
//
// FIRKIN_WORKER overrides the worker binary (default <repo>/bin/firkin-worker);
// FIRKIN_TEST_CACHE, when set, lends its cached Debian packages (debs/) to the
// worker's image build.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, readFileSync, readdirSync, mkdirSync, symlinkSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import http from 'node:http';
import { connect as natsConnect, nkeyAuthenticator, StringCodec } from 'nats';

const here = dirname(fileURLToPath(import.meta.url));
const repo = join(here, '..', '..', '..');
const workerBin = process.env.FIRKIN_WORKER || join(repo, 'bin', 'firkin-worker');

// How long the worker may take to be ready: a first start builds the guest
// images and the template snapshot (minutes under TCG).
const READY_TIMEOUT_MS = 10 * 60_000;

let worker; // the child process
let workerExited = false;
let logTail = [];
let stateDir;
let ports;
let apiKey;
let nc; // a NATS client of the worker (client identity), for what envd would do
let E2B; // the SDK module, imported once the environment is set

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function tail() {
  return logTail.slice(-60).join('\n');
}

// waitForLog resolves when the worker logged every message in msgs.
function waitForLogs(msgs, timeoutMs) {
  return new Promise((resolve, reject) => {
    const seen = new Set();
    const timer = setTimeout(() => reject(new Error(`worker not ready after ${timeoutMs} ms; log tail:\n${tail()}`)), timeoutMs);
    const onLine = (line) => {
      let rec;
      try { rec = JSON.parse(line); } catch { return; }
      if (rec.level === 'ERROR' && rec.msg === 'built-in templates') {
        // The worker cannot make its templates: fail now, not at the timeout.
        clearTimeout(timer);
        worker.off('line', onLine);
        reject(new Error(`the worker could not build its templates: ${rec.err}`));
        return;
      }
      if (msgs.includes(rec.msg)) seen.add(rec.msg);
      if (seen.size === msgs.length) {
        clearTimeout(timer);
        worker.off('line', onLine);
        resolve();
      }
    };
    worker.on('line', onLine);
    worker.once('exit', (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`worker exited (${code ?? sig}) before it was ready; log tail:\n${tail()}`));
    });
  });
}

function killWorker() {
  if (worker && !workerExited) {
    try { process.kill(worker.pid, 'SIGKILL'); } catch { /* gone */ }
  }
}
// A test runner that dies must not leave the worker behind.
process.on('exit', killWorker);

before(async () => {
  assert.ok(existsSync(workerBin), `${workerBin} is missing: run make build (make e2b-test does)`);
  stateDir = mkdtempSync(join(tmpdir(), 'firkin-e2b-sdk-'));
  // Lend the test cache's Debian packages to the image build.
  const debs = process.env.FIRKIN_TEST_CACHE && join(process.env.FIRKIN_TEST_CACHE, 'debs');
  if (debs && existsSync(debs)) {
    mkdirSync(join(stateDir, 'cache'), { recursive: true });
    for (const d of readdirSync(debs)) symlinkSync(join(debs, d), join(stateDir, 'cache', d));
  }
  ports = { nats: await freePort(), proxy: await freePort(), e2b: await freePort() };
  const env = { ...process.env, FIRKIN_LOG_FORMAT: 'json' };
  delete env.FIRKIN_E2B_API_KEYS; // the worker makes a key in the state dir
  worker = spawn(workerBin, [
    '--state-dir', stateDir,
    '--nats-listen', `127.0.0.1:${ports.nats}`,
    '--proxy-listen', `127.0.0.1:${ports.proxy}`,
    '--e2b-listen', `127.0.0.1:${ports.e2b}`,
    '--metrics-listen', '',
    '--keep-machines=false',
  ], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  worker.on('exit', () => { workerExited = true; });
  let buf = '';
  worker.stderr.on('data', (chunk) => {
    buf += chunk.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      logTail.push(line);
      if (logTail.length > 400) logTail = logTail.slice(-400);
      worker.emit('line', line);
    }
  });
  await waitForLogs(['templates ready', 'E2B API ready'], READY_TIMEOUT_MS);

  // The README's way: the key the worker made, the API and the proxy.
  apiKey = readFileSync(join(stateDir, 'e2b-api-key'), 'utf8').trim();
  process.env.E2B_API_KEY = apiKey;
  process.env.E2B_API_URL = `http://127.0.0.1:${ports.e2b}`;
  process.env.E2B_SANDBOX_URL = `http://127.0.0.1:${ports.proxy}`;
  E2B = await import('e2b');

  const seed = readFileSync(join(stateDir, 'client.nk'), 'utf8').trim();
  nc = await natsConnect({ servers: `127.0.0.1:${ports.nats}`, authenticator: nkeyAuthenticator(new TextEncoder().encode(seed)) });
});

after(async () => {
  if (nc) await nc.close().catch(() => {});
  if (worker && !workerExited) {
    const exited = new Promise((resolve) => worker.once('exit', resolve));
    worker.kill('SIGTERM');
    const timer = setTimeout(killWorker, 60_000);
    await exited;
    clearTimeout(timer);
  }
  if (stateDir) rmSync(stateDir, { recursive: true, force: true, maxRetries: 3 });
});

// exec runs a command in the sandbox through the worker's NATS API (firkin's
// own exec, which the latency measurement sets against commands.run).
async function exec(sandboxId, command) {
  const sc = StringCodec();
  const msg = await nc.request(`firkin.sandbox.${sandboxId}.exec`, sc.encode(JSON.stringify({ command, timeout_ms: 30_000 })), { timeout: 60_000 });
  const reply = JSON.parse(sc.decode(msg.data));
  assert.equal(reply.exit_code, 0, `exec ${command}: ${sc.decode(msg.data)}`);
  return reply;
}

// getThroughProxy GETs path on host (as getHost gives it) at the proxy.
function getThroughProxy(host, path = '/') {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: ports.proxy, path, headers: { host }, timeout: 30_000 }, (res) => {
      let body = '';
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

// waitFor polls cond every 50 ms until it holds or timeoutMs passes.
async function waitFor(cond, timeoutMs, what) {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// percentile is the nearest-rank p-th percentile of ms.
function percentile(ms, p) {
  const s = [...ms].sort((a, b) => a - b);
  return s[Math.max(0, Math.ceil((p / 100) * s.length) - 1)];
}

// timeRuns times n sequential calls of fn (after one warm-up call).
async function timeRuns(n, fn) {
  await fn();
  const ms = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    await fn();
    ms.push(performance.now() - t0);
  }
  return { p50: percentile(ms, 50), p95: percentile(ms, 95), max: Math.max(...ms) };
}

const run = randomBytes(6).toString('hex');
const note = 'a b&c=d/é'; // a metadata value that needs encoding
// The envd version the control API reports (envd.Version).
const E2B_ENVD_VERSION = '0.5.7';

test('a wrong API key is refused', async () => {
  await assert.rejects(E2B.Sandbox.create('base', { apiKey: 'e2b_' + '0'.repeat(40) }), E2B.AuthenticationError);
  await assert.rejects(E2B.Sandbox.list({ apiKey: 'not-a-key-at-all-xyz' }).nextItems(), E2B.AuthenticationError);
  const res = await fetch(`${process.env.E2B_API_URL}/v2/sandboxes`);
  assert.equal(res.status, 401);
  const body = await res.json();
  assert.equal(body.code, 401);
  assert.equal(typeof body.message, 'string');
});

test('an unknown template is refused', async () => {
  await assert.rejects(E2B.Sandbox.create('no-such-template-e2b'), (err) => /404|400/.test(String(err.message)));
});

test('sandbox lifecycle through the SDK', { timeout: 10 * 60_000 }, async (t) => {
  const sbx = await E2B.Sandbox.create('base', { metadata: { suite: 'e2b-sdk', run, note }, timeoutMs: 120_000 });
  t.after(() => sbx.kill().catch(() => {}));
  assert.match(sbx.sandboxId, /^[a-z][a-z0-9]{19}$/);

  await t.test('getInfo', async () => {
    const info = await sbx.getInfo();
    assert.equal(info.sandboxId, sbx.sandboxId);
    assert.equal(info.templateId, 'base');
    assert.equal(info.state, 'running');
    assert.deepEqual(info.metadata, { suite: 'e2b-sdk', run, note });
    assert.ok(info.cpuCount >= 1 && info.memoryMB >= 128, JSON.stringify(info));
    assert.ok(info.endAt > info.startedAt);
    assert.equal(info.lifecycle.onTimeout, 'kill');
    assert.equal(info.envdVersion, E2B_ENVD_VERSION);
  });

  await t.test('list with a metadata filter', async () => {
    const mine = await E2B.Sandbox.list({ query: { metadata: { run, note } } }).nextItems();
    assert.deepEqual(mine.map((s) => s.sandboxId), [sbx.sandboxId]);
    assert.deepEqual(mine[0].metadata, { suite: 'e2b-sdk', run, note });
    const none = await E2B.Sandbox.list({ query: { metadata: { run: run + 'x' } } }).nextItems();
    assert.deepEqual(none, []);
    const paused = await E2B.Sandbox.list({ query: { metadata: { run }, state: ['paused'] } }).nextItems();
    assert.deepEqual(paused, []);
  });

  await t.test('setTimeout', async () => {
    await sbx.setTimeout(600_000);
    const info = await sbx.getInfo();
    const left = info.endAt.getTime() - Date.now();
    assert.ok(left > 540_000 && left <= 601_000, `${left} ms left`);
  });

  await t.test('getMetrics', async () => {
    const m = await sbx.getMetrics();
    assert.ok(Array.isArray(m));
  });

  // The sandbox API (envd at port 49983, through the proxy, secure: every
  // v2 create is) on the same sandbox.
  await t.test('commands.run: stdout, stderr and exit code', async () => {
    const r = await sbx.commands.run('echo hi; echo oops >&2');
    assert.equal(r.exitCode, 0);
    assert.equal(r.stdout, 'hi\n');
    assert.equal(r.stderr, 'oops\n');
    assert.equal((await sbx.commands.run('id -un')).stdout.trim(), 'user', 'the default user');
    assert.equal((await sbx.commands.run('id -u', { user: 'root' })).stdout.trim(), '0');
    assert.equal((await sbx.commands.run('echo $FOO; pwd', { envs: { FOO: 'bar' }, cwd: '/tmp' })).stdout, 'bar\n/tmp\n');
    const err = await sbx.commands.run('echo out; echo err >&2; exit 3').then(() => null, (e) => e);
    assert.ok(err instanceof E2B.CommandExitError, String(err));
    assert.equal(err.exitCode, 3);
    assert.equal(err.message, 'exit status 3', 'the message envd gives');
    assert.equal(err.stdout, 'out\n');
    assert.equal(err.stderr, 'err\n');
  });

  await t.test('a background command streams onStdout and is killed', async () => {
    const seen = [];
    const h = await sbx.commands.run('for i in 1 2 3; do echo tick$i; sleep 0.2; done; exec sleep 300', {
      background: true, onStdout: (d) => seen.push(d),
    });
    assert.ok(h.pid > 0, String(h.pid));
    await waitFor(() => seen.join('').includes('tick3'), 20_000, () => `tick3 in ${JSON.stringify(seen)}`);
    assert.equal(seen.join(''), 'tick1\ntick2\ntick3\n');
    assert.ok((await sbx.commands.list()).some((p) => p.pid === h.pid), 'commands.list has the command');
    assert.equal(await h.kill(), true);
    const end = await h.wait().then(() => null, (e) => e);
    assert.ok(end instanceof E2B.CommandExitError, String(end));
    assert.match(end.error, /killed/);
    assert.ok(!(await sbx.commands.list()).some((p) => p.pid === h.pid), 'a killed command is not listed');
    assert.equal(await sbx.commands.kill(h.pid), false, 'killing it again says false');
  });

  await t.test('a command is killed when its timeoutMs passes', async () => {
    const err = await sbx.commands.run(`exec sleep 37${run.length}`, { timeoutMs: 1000 }).then(() => null, (e) => e);
    assert.ok(err instanceof E2B.TimeoutError, String(err));
    const sleeping = async () => (await sbx.commands.list()).some((p) => p.args.join(' ').includes(`sleep 37${run.length}`));
    for (let i = 0; i < 50 && await sleeping(); i++) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await sleeping(), false, 'the command outlived its timeoutMs');
  });

  await t.test('files: write, read (text and bytes), list, remove', async () => {
    const info = await sbx.files.write('notes/a.txt', `hello ${note}`);
    assert.equal(info.path, '/home/user/notes/a.txt', 'a relative path is in the user\'s home');
    assert.equal(await sbx.files.read('/home/user/notes/a.txt'), `hello ${note}`);
    const bin = new Uint8Array(70_000).map((_, i) => (i * 13 + (i >> 8)) & 255);
    await sbx.files.write('notes/b.bin', bin.buffer);
    const back = await sbx.files.read('notes/b.bin', { format: 'bytes' });
    assert.ok(back instanceof Uint8Array);
    assert.equal(back.length, bin.length);
    assert.ok(Buffer.from(back).equals(Buffer.from(bin)), 'the bytes come back unchanged');
    const ls = await sbx.files.list('notes');
    assert.deepEqual(ls.map((e) => `${e.name}:${e.type}:${e.size}`).sort(), [`a.txt:file:${Buffer.byteLength(`hello ${note}`)}`, 'b.bin:file:70000']);
    assert.equal(ls.find((e) => e.name === 'a.txt').path, '/home/user/notes/a.txt');
    await sbx.files.remove('notes/b.bin');
    assert.equal(await sbx.files.exists('notes/b.bin'), false);
    assert.deepEqual((await sbx.files.list('notes')).map((e) => e.name), ['a.txt']);
    await assert.rejects(sbx.files.read('notes/b.bin'), E2B.NotFoundError);
    // What files.write wrote is what the guest sees.
    assert.equal((await sbx.commands.run('cat notes/a.txt')).stdout, `hello ${note}`);
  });

  await t.test('files.watchDir sees a create, and with recursive one below', async () => {
    await sbx.files.makeDir('/tmp/watched/sub');
    const events = [];
    const w = await sbx.files.watchDir('/tmp/watched', (e) => events.push(e));
    try {
      await sbx.files.write('/tmp/watched/new.txt', 'x');
      await waitFor(() => events.some((e) => e.name === 'new.txt' && e.type === E2B.FilesystemEventType.CREATE), 20_000,
        () => `a create of new.txt in ${JSON.stringify(events)}`);
    } finally {
      await w.stop();
    }
    assert.ok(!events.some((e) => e.name.includes('.firkin-')), `no temporary file shows: ${JSON.stringify(events)}`);

    const deep = [];
    const rw = await sbx.files.watchDir('/tmp/watched', (e) => deep.push(e), { recursive: true });
    try {
      await sbx.files.write('/tmp/watched/sub/deep.txt', 'y');
      await sbx.commands.run('mkdir /tmp/watched/sub/later && echo z > /tmp/watched/sub/later/z.txt');
      await waitFor(() => deep.some((e) => e.name === 'sub/later/z.txt' && e.type === E2B.FilesystemEventType.CREATE), 20_000,
        () => `a create of sub/later/z.txt in ${JSON.stringify(deep)}`);
      assert.ok(deep.some((e) => e.name === 'sub/deep.txt' && e.type === E2B.FilesystemEventType.CREATE), JSON.stringify(deep));
    } finally {
      await rw.stop();
    }
  });

  await t.test('pty: input and resize', async () => {
    let out = '';
    const dec = new TextDecoder();
    const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => { out += dec.decode(d, { stream: true }); } });
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('echo in-$((6*7)); stty size\n'));
    await waitFor(() => out.includes('in-42') && out.includes('24 80'), 20_000, () => `in-42 and 24 80 in ${JSON.stringify(out.slice(-300))}`);
    await sbx.pty.resize(term.pid, { cols: 120, rows: 40 });
    await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; exit\n'));
    const r = await term.wait();
    assert.equal(r.exitCode, 0);
    assert.ok(out.includes('40 120'), `the new size in ${JSON.stringify(out.slice(-300))}`);
  });

  await t.test('a wrong envd access token is refused', async () => {
    assert.ok(sbx.envdAccessToken, 'a v2 sandbox is secure: it has an envd access token');
    const bad = new E2B.Sandbox({ sandboxId: sbx.sandboxId, envdAccessToken: 'x'.repeat(64), envdVersion: E2B_ENVD_VERSION });
    await assert.rejects(bad.commands.run('echo no'), E2B.AuthenticationError);
    await assert.rejects(bad.files.read('/etc/hostname'), E2B.AuthenticationError);
    await assert.rejects(bad.files.write('/tmp/no.txt', 'no'), E2B.AuthenticationError);
    await assert.rejects(bad.files.list('/tmp'), E2B.AuthenticationError);
    assert.equal(await sbx.files.exists('/tmp/no.txt'), false, 'a refused write wrote nothing');
    // No token at all, straight at the proxy.
    const headers = { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49983' };
    const res = await fetch(`${process.env.E2B_SANDBOX_URL}/files?path=/etc/hostname`, { headers });
    assert.equal(res.status, 401);
    assert.equal((await res.json()).code, 401);
    assert.equal((await fetch(`${process.env.E2B_SANDBOX_URL}/health`, { headers })).status, 204, '/health is open');
  });

  await t.test('commands.run latency against NATS exec (a measurement)', async () => {
    const n = 20;
    const sdk = await timeRuns(n, async () => assert.equal((await sbx.commands.run('echo hi')).stdout, 'hi\n'));
    const natsExec = await timeRuns(n, async () => assert.equal((await exec(sbx.sandboxId, 'echo hi')).stdout, 'hi\n'));
    const f = (x) => `p50 ${x.p50.toFixed(1)} ms, p95 ${x.p95.toFixed(1)} ms, max ${x.max.toFixed(1)} ms`;
    console.log(`# latency of 'echo hi' over ${n} runs: SDK commands.run ${f(sdk)}; firkin NATS exec ${f(natsExec)}`);
  });

  let server; // the background command serving getHost
  await t.test('getHost reaches a server in the sandbox through the proxy', async () => {
    await sbx.files.write('/tmp/www/index.html', `hello-${run}\n`);
    // timeoutMs 0: no lifetime (the SDK's default, 60 s, would end it then).
    server = await sbx.commands.run('exec httpd -f -p 8000 -h /tmp/www', { background: true, timeoutMs: 0 });
    const host = sbx.getHost(8000);
    assert.equal(host, `8000-${sbx.sandboxId}.localhost:${ports.proxy}`);
    // The server listens a moment after it starts: poll, bounded.
    let res;
    for (let i = 0; i < 50; i++) {
      res = await getThroughProxy(host).catch((e) => ({ status: 0, body: String(e) }));
      if (res.status === 200) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(res.status, 200, res.body);
    assert.equal(res.body.trim(), `hello-${run}`);
    // Stop following it: the server goes on in the sandbox.
    await server.disconnect();
  });

  await t.test('pause and connect keep the sandbox', async () => {
    await sbx.files.write('/home/user/kept.txt', `kept-${run}`);
    assert.equal(await sbx.pause(), true);
    assert.equal((await sbx.getInfo()).state, 'paused');
    assert.equal(await sbx.pause(), false, 'pausing a paused sandbox says false');
    const paused = await E2B.Sandbox.list({ query: { metadata: { run }, state: ['paused'] } }).nextItems();
    assert.deepEqual(paused.map((s) => s.sandboxId), [sbx.sandboxId]);

    const again = await E2B.Sandbox.connect(sbx.sandboxId, { timeoutMs: 300_000 });
    assert.equal(again.sandboxId, sbx.sandboxId);
    assert.equal(again.envdAccessToken, sbx.envdAccessToken, 'connect hands out the same envd token');
    assert.equal((await again.getInfo()).state, 'running');
    // The file written before the pause is there.
    assert.equal(await again.files.read('/home/user/kept.txt'), `kept-${run}`);
    assert.equal((await again.commands.run('cat kept.txt')).stdout, `kept-${run}`);
    // The server and its file came back with the machine.
    assert.ok((await again.commands.list()).some((p) => p.pid === server.pid), 'the server still runs');
    const res = await getThroughProxy(again.getHost(8000));
    assert.equal(res.status, 200, res.body);
    assert.equal(res.body.trim(), `hello-${run}`);
    // connect on a running sandbox is fine too.
    await again.connect();
    assert.equal(await again.commands.kill(server.pid), true);
  });

  await t.test('kill', async () => {
    assert.equal(await sbx.isRunning(), true);
    assert.equal(await sbx.kill(), true);
    // The sandbox API of a killed sandbox says it is not running.
    assert.equal(await sbx.isRunning(), false);
    await assert.rejects(sbx.commands.run('echo hi'), E2B.SandboxNotFoundError);
    await assert.rejects(sbx.files.read('/home/user/kept.txt'), E2B.TimeoutError);
    await assert.rejects(E2B.Sandbox.getInfo(sbx.sandboxId), E2B.SandboxNotFoundError);
    assert.equal(await E2B.Sandbox.kill(sbx.sandboxId), false);
    const mine = await E2B.Sandbox.list({ query: { metadata: { run } } }).nextItems();
    assert.deepEqual(mine, []);
  });
});

test('snapshots and fork through the SDK', { timeout: 10 * 60_000 }, async (t) => {
  const src = await E2B.Sandbox.create('base', { metadata: { run, role: 'source' }, timeoutMs: 300_000 });
  t.after(() => src.kill().catch(() => {}));
  await src.files.write('/root/state.txt', `kept-${run}\n`, { user: 'root' });

  await t.test('fork', async () => {
    const forks = await src.fork({ count: 1, timeoutMs: 120_000 });
    assert.equal(forks.length, 1);
    const [fork] = forks;
    assert.ok(fork instanceof E2B.Sandbox, String(fork));
    try {
      assert.notEqual(fork.sandboxId, src.sandboxId);
      const out = await fork.commands.run('cat /root/state.txt', { user: 'root' });
      assert.equal(out.stdout.trim(), `kept-${run}`);
      assert.equal((await src.getInfo()).state, 'running', 'the source goes on running');
    } finally {
      await fork.kill();
    }
  });

  await t.test('createSnapshot, create from it, list and delete it', async (t) => {
    const snap = await src.createSnapshot({ name: `snap-${run}` });
    assert.equal(snap.snapshotId, `snap-${run}`);
    assert.deepEqual(snap.names, [`snap-${run}`]);
    const listed = await E2B.Sandbox.listSnapshots({ sandboxId: src.sandboxId }).nextItems();
    assert.deepEqual(listed.map((s) => s.snapshotId), [`snap-${run}`]);

    const child = await E2B.Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 });
    t.after(() => child.kill().catch(() => {}));
    assert.notEqual(child.sandboxId, src.sandboxId);
    const out = await child.commands.run('cat /root/state.txt', { user: 'root' });
    assert.equal(out.stdout.trim(), `kept-${run}`);
    assert.equal((await child.getInfo()).templateId, snap.snapshotId);
    assert.equal(await child.kill(), true);
    // firkin: a running sandbox's disk sits on the snapshot it was saved
    // to (the source's too), so the snapshot is deleted once both are gone.
    await assert.rejects(E2B.Sandbox.deleteSnapshot(snap.snapshotId), /409/);
    assert.equal(await src.kill(), true);

    // A kill's release of the disk may trail its reply a little: poll, bounded.
    let deleted;
    for (let i = 0; i < 20; i++) {
      try {
        deleted = await E2B.Sandbox.deleteSnapshot(snap.snapshotId);
        break;
      } catch (err) {
        if (!/409/.test(String(err.message)) || i === 19) throw err;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
    assert.equal(deleted, true);
    assert.equal(await E2B.Sandbox.deleteSnapshot(snap.snapshotId), false);
    // firkin's own templates are not E2B's to delete.
    await assert.rejects(E2B.Sandbox.deleteSnapshot('tiny'), /400/);
  });
});
