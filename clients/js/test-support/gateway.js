// Starts a real ringgate gateway for the tests (dev mode unless given a secret), on free
// loopback ports, and learns them from the line it prints (as tests/common/mod.rs does).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** `RINGGATE_BIN`, else the newer of the release and debug builds (a stale one misleads). */
export function gatewayBinary() {
  if (process.env.RINGGATE_BIN && existsSync(process.env.RINGGATE_BIN)) return process.env.RINGGATE_BIN;
  const built = [`${root}/target/release/ringgate`, `${root}/target/debug/ringgate`]
    .filter((p) => existsSync(p))
    .sort((a, b) => statSync(b).mtimeMs - statSync(a).mtimeMs);
  if (built.length) return built[0];
  assert.fail(
    `no ringgate binary in ${root}/target/{release,debug}: build it first with\n` +
      `  (cd ${root} && cargo build --release --bin ringgate)`,
  );
}

/** Start a gateway on free loopback ports; resolves with its addresses once it said them. */
export function startGateway(extraArgs = []) {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('RINGGATE_') && k !== 'RUST_LOG'));
  const child = spawn(gatewayBinary(), ['serve', '--listen', '127.0.0.1:0', '--admin-listen', '127.0.0.1:0', '--shards', '2', ...extraArgs], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve, reject) => {
    const deadline = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`ringgate did not report its ports in 20 s; stderr:\n${stderr}`));
    }, 20000);
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = /ws:\/\/(\S+) admin http:\/\/(\S+)/.exec(out);
      if (m) {
        clearTimeout(deadline);
        resolve({ child, ws: `ws://${m[1]}/ws`, admin: m[2], stderr: () => stderr });
      }
    });
    child.on('exit', (code) => {
      clearTimeout(deadline);
      reject(new Error(`ringgate exited (${code}) before it listened; stderr:\n${stderr}`));
    });
  });
}

