// The official E2B JavaScript SDK (npm e2b, pinned in package-lock.json),
// unchanged, against a firkin worker started the README's way: embedded
// NATS, the default driver, a temporary state directory, --e2b-listen and
// the proxy on free loopback ports. The SDK is pointed at it with
// E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY only.
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

// exec runs a command in the sandbox through the worker's NATS API (what
// sandbox.commands.run will do through the envd API).
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

const run = randomBytes(6).toString('hex');
const note = 'a b&c=d/é'; // a metadata value that needs encoding

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
    assert.equal(info.envdVersion, '0.5.7');
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

  await t.test('getHost reaches a server in the sandbox through the proxy', async () => {
    await exec(sbx.sandboxId, `mkdir -p /tmp/www && echo hello-${run} > /tmp/www/index.html && httpd -p 8000 -h /tmp/www </dev/null >/dev/null 2>&1`);
    const host = sbx.getHost(8000);
    assert.equal(host, `8000-${sbx.sandboxId}.localhost:${ports.proxy}`);
    const res = await getThroughProxy(host);
    assert.equal(res.status, 200, res.body);
    assert.equal(res.body.trim(), `hello-${run}`);
  });

  await t.test('pause and connect keep the sandbox', async () => {
    assert.equal(await sbx.pause(), true);
    assert.equal((await sbx.getInfo()).state, 'paused');
    assert.equal(await sbx.pause(), false, 'pausing a paused sandbox says false');
    const paused = await E2B.Sandbox.list({ query: { metadata: { run }, state: ['paused'] } }).nextItems();
    assert.deepEqual(paused.map((s) => s.sandboxId), [sbx.sandboxId]);

    const again = await E2B.Sandbox.connect(sbx.sandboxId, { timeoutMs: 300_000 });
    assert.equal(again.sandboxId, sbx.sandboxId);
    assert.equal((await again.getInfo()).state, 'running');
    // The server and its file came back with the machine.
    const res = await getThroughProxy(again.getHost(8000));
    assert.equal(res.status, 200, res.body);
    assert.equal(res.body.trim(), `hello-${run}`);
    // connect on a running sandbox is fine too.
    await again.connect();
  });

  await t.test('kill', async () => {
    assert.equal(await sbx.kill(), true);
    await assert.rejects(E2B.Sandbox.getInfo(sbx.sandboxId), E2B.SandboxNotFoundError);
    assert.equal(await E2B.Sandbox.kill(sbx.sandboxId), false);
    const mine = await E2B.Sandbox.list({ query: { metadata: { run } } }).nextItems();
    assert.deepEqual(mine, []);
  });
});

test('snapshots and fork through the SDK', { timeout: 10 * 60_000 }, async (t) => {
  const src = await E2B.Sandbox.create('base', { metadata: { run, role: 'source' }, timeoutMs: 300_000 });
  t.after(() => src.kill().catch(() => {}));
  await exec(src.sandboxId, `echo kept-${run} > /root/state.txt && sync`);

  await t.test('fork', async () => {
    const forks = await src.fork({ count: 1, timeoutMs: 120_000 });
    assert.equal(forks.length, 1);
    const [fork] = forks;
    assert.ok(fork instanceof E2B.Sandbox, String(fork));
    try {
      assert.notEqual(fork.sandboxId, src.sandboxId);
      const out = await exec(fork.sandboxId, 'cat /root/state.txt');
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
    const out = await exec(child.sandboxId, 'cat /root/state.txt');
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
