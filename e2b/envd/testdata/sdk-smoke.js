// sdk-smoke.js drives a sandbox's E2B sandbox API with the official E2B SDK
// (npm e2b 2.51.0) alone, without the control API: the sandbox id and its
// envd access token come from the environment. Not run by make test (the
// Node test of issue 13 covers the SDK end to end); run it by hand against
// a worker and a sandbox created with "secure":true:
//
//   npm install e2b@2.51.0
//   SID=<sandbox id> TOK=<envd_access_token> E2B_SANDBOX_URL=http://127.0.0.1:8080 node sdk-smoke.js
//
// Every line it prints starts with ok or FAIL; the exit status is 1 on a
// failure.
const { Sandbox } = require('e2b');
const assert = (c, m) => { if (!c) { console.error('FAIL ' + m); process.exitCode = 1 } else console.log('ok ' + m) };
(async () => {
  const sbx = new Sandbox({ sandboxId: process.env.SID, envdAccessToken: process.env.TOK, envdVersion: '0.5.7',
    sandboxUrl: process.env.E2B_SANDBOX_URL, apiKey: 'unused', requestTimeoutMs: 60000 });
  let t0 = Date.now();
  const r = await sbx.commands.run('echo hi');
  console.log('commands.run echo hi ms', Date.now() - t0);
  t0 = Date.now();
  for (let i = 0; i < 5; i++) await sbx.commands.run('echo hi');
  console.log('commands.run echo hi avg ms', (Date.now() - t0) / 5);
  assert(r.stdout === 'hi\n' && r.exitCode === 0, 'commands.run ' + JSON.stringify(r));
  try { await sbx.commands.run('echo out; echo err >&2; exit 3'); assert(false, 'exit 3 throws') }
  catch (e) { assert(e.exitCode === 3 && e.stdout === 'out\n' && e.stderr === 'err\n', 'CommandExitError ' + e.exitCode + ' ' + JSON.stringify(e.stdout) + JSON.stringify(e.stderr)) }
  const seen = [];
  const h = await sbx.commands.run('for i in 1 2 3; do echo tick$i; sleep 0.3; done; sleep 60', { background: true, onStdout: d => seen.push(d) });
  await new Promise(res => setTimeout(res, 2500));
  assert(seen.join('').includes('tick3'), 'background onStdout ' + JSON.stringify(seen));
  const listed = await sbx.commands.list();
  assert(listed.some(p => p.pid === h.pid), 'commands.list has pid ' + h.pid);
  assert(await h.kill(), 'kill');
  const w = await sbx.commands.run('cat', { background: true, stdin: true });
  await sbx.commands.sendStdin(w.pid, 'to cat\n');
  await new Promise(res => setTimeout(res, 1000));
  assert(w.stdout.includes('to cat'), 'sendStdin ' + JSON.stringify(w.stdout));
  await sbx.commands.closeStdin(w.pid);
  const wr = await w.wait();
  assert(wr.exitCode === 0, 'closeStdin then wait');

  const info = await sbx.files.write('/tmp/sdk/a.txt', 'hello files');
  assert(info.path === '/tmp/sdk/a.txt', 'files.write ' + JSON.stringify(info));
  assert(await sbx.files.read('/tmp/sdk/a.txt') === 'hello files', 'files.read');
  const bin = new Uint8Array(70000).map((_, i) => (i * 13) & 255);
  await sbx.files.write('/tmp/sdk/b.bin', bin.buffer);
  const back = await sbx.files.read('/tmp/sdk/b.bin', { format: 'bytes' });
  assert(back.length === bin.length && back.every((v, i) => v === bin[i]), 'binary round trip');
  await sbx.files.write([{ path: '/tmp/sdk/m1', data: '1' }, { path: '/tmp/sdk/m2', data: '2' }]);
  const ls = await sbx.files.list('/tmp/sdk');
  assert(ls.map(e => e.name).sort().join(',') === 'a.txt,b.bin,m1,m2', 'files.list ' + ls.map(e => e.name + ':' + e.type).join(','));
  assert(await sbx.files.exists('/tmp/sdk/m1'), 'exists');
  assert(await sbx.files.makeDir('/tmp/sdk/d') === true && await sbx.files.makeDir('/tmp/sdk/d') === false, 'makeDir twice');
  await sbx.files.rename('/tmp/sdk/m1', '/tmp/sdk/m3');
  const ev = [];
  const wh = await sbx.files.watchDir('/tmp/sdk', e => ev.push(e));
  await sbx.files.write('/tmp/sdk/new.txt', 'x');
  await sbx.files.remove('/tmp/sdk/m2');
  await new Promise(res => setTimeout(res, 2000));
  await wh.stop();
  assert(ev.some(e => e.name === 'new.txt') && ev.some(e => e.name === 'm2' && e.type === 'remove'), 'watchDir ' + JSON.stringify(ev));
  const home = await sbx.files.write('rel.txt', 'r');
  assert(home.path === '/home/user/rel.txt', 'relative path ' + home.path);
  const asRoot = await sbx.commands.run('id -u', { user: 'root' });
  assert(asRoot.stdout.trim() === '0', 'user root');

  let out = '';
  const term = await sbx.pty.create({ cols: 80, rows: 24, onData: d => { out += new TextDecoder().decode(d) } });
  await sbx.pty.resize(term.pid, { cols: 120, rows: 40 });
  await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; exit\n'));
  await term.wait().catch(() => {});
  assert(out.includes('40 120'), 'pty resize ' + JSON.stringify(out.slice(-200)));

  const bad = new Sandbox({ sandboxId: process.env.SID, envdAccessToken: 'wrong', envdVersion: '0.5.7', sandboxUrl: process.env.E2B_SANDBOX_URL, apiKey: 'unused' });
  try { await bad.commands.run('echo no'); assert(false, 'wrong token refused') } catch (e) { assert(/401|unauth|access/i.test(String(e)), 'wrong token refused: ' + e) }
  try { await bad.files.read('/etc/hostname'); assert(false, 'wrong token refused (files)') } catch (e) { assert(true, 'wrong token refused (files): ' + e.constructor.name) }
})().catch(e => { console.error('ERROR', e); process.exitCode = 1 });
