// Wires the layers: configuration -> block node -> export -> server ->
// listeners, then runs until a signal, or until the last client leaves
// when not persistent (as qemu-nbd does).
import fs from 'node:fs';
import { openBlockNode } from '../block/open.ts';
import type { BlockNode } from '../block/types.ts';
import { Export } from '../exports/export.ts';
import { ExportRegistry } from '../exports/registry.ts';
import { createLogger, type Logger } from '../server/log.ts';
import { NbdServer } from '../server/server.ts';
import { parseArgs, type Config } from './args.ts';
import { formatSize, UsageError } from './size.ts';

const QCOW2_MAGIC = Buffer.from('QFI\xfb', 'latin1');

/** A failure to start, reported as one line without a stack trace. */
class StartError extends Error {
  override name = 'StartError';
}

export async function main(argv: string[]): Promise<number> {
  let config: Config | null;
  try {
    config = parseArgs(argv);
  } catch (err) {
    return fail(err);
  }
  if (config === null) return 0;
  const log = createLogger(config.logLevel);
  try {
    await run(config, log);
    return 0;
  } catch (err) {
    return fail(err);
  }
}

function fail(err: unknown): number {
  if (err instanceof UsageError) {
    process.stderr.write(`nbd-export: ${err.message}\nTry 'nbd-export --help' for more information.\n`);
  } else if (err instanceof StartError) {
    process.stderr.write(`nbd-export: ${err.message}\n`);
  } else {
    process.stderr.write(`nbd-export: ${err instanceof Error ? err.message : String(err)}\n`);
  }
  return 1;
}

async function openImage(config: Config): Promise<BlockNode> {
  const common = {
    readOnly: config.readOnly,
    cache: config.cache,
    discard: config.discard,
    detectZeroes: config.detectZeroes,
  };
  if (config.image.kind === 'memory') {
    return openBlockNode({ kind: 'memory', size: config.image.size, ...common });
  }
  const path = config.image.path;
  if (config.format === undefined) refuseOtherFormats(path);
  try {
    return await openBlockNode({ kind: 'file', path, offset: config.offset, ...common });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason = err instanceof Error ? err.message : String(err);
    const hint = !config.readOnly && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM') ? ' (use -r/--read-only to serve it read-only)' : '';
    throw new StartError(`cannot open '${path}': ${reason}${hint}`);
  }
}

/** Without -f, refuse to serve a qcow2 image as raw bytes (qemu-nbd would probe it). */
function refuseOtherFormats(path: string): void {
  let fd: number;
  try {
    fd = fs.openSync(path, 'r');
  } catch {
    return; // the real open reports the error with its hint
  }
  try {
    const head = Buffer.alloc(4);
    try {
      fs.readSync(fd, head, 0, 4, 0);
    } catch {
      return; // a directory, say: the real open says what is wrong
    }
    if (head.equals(QCOW2_MAGIC)) {
      throw new StartError(`'${path}' is a qcow2 image, which is not supported yet; pass -f raw to serve its bytes as they are`);
    }
  } finally {
    fs.closeSync(fd);
  }
}

function uriFor(config: Config, port: number): string {
  const name = encodeURIComponent(config.exportName);
  if (config.socket !== undefined) return `nbd+unix:///${name}?socket=${encodeURIComponent(config.socket)}`;
  const wildcard = config.bind === '0.0.0.0' || config.bind === '::';
  const host = wildcard ? 'localhost' : config.bind.includes(':') ? `[${config.bind}]` : config.bind;
  return `nbd://${host}:${port}/${name}`;
}

async function run(config: Config, log: Logger): Promise<void> {
  const node = await openImage(config);
  const exports = new ExportRegistry();
  exports.add(
    new Export({
      name: config.exportName,
      description: config.description,
      node,
      readOnly: config.readOnly,
      // DESIGN invariant 2: multi-conn exactly when more than one client may connect.
      multiConn: config.shared !== 1,
    }),
  );
  const server = new NbdServer({
    exports,
    maxConnections: config.shared,
    persistent: config.persistent,
    handshakeLimitMs: config.handshakeLimitSeconds * 1000,
    log,
  });

  let port = config.port;
  try {
    if (config.socket !== undefined) {
      await server.listenUnix(config.socket);
    } else {
      port = (await server.listenTcp(config.bind, config.port)).port;
    }
  } catch (err) {
    await node.close();
    const where = config.socket ?? `${config.bind}:${config.port}`;
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === 'EADDRINUSE' ? 'address already in use' : err instanceof Error ? err.message : String(err);
    throw new StartError(`cannot listen on ${where}: ${reason}`);
  }

  if (config.pidFile !== undefined) fs.writeFileSync(config.pidFile, `${process.pid}\n`);
  const uri = uriFor(config, port);
  log.info(`serving '${config.imageName}' (${formatSize(node.size)}${config.readOnly ? ', read-only' : ''}) at ${uri}`);
  if (config.printUri) {
    process.stdout.write(`${uri}\n`);
    process.stderr.write(`nbd-export: serving '${config.imageName}' (${formatSize(node.size)}); try: nbdinfo ${uri}\n`);
  }

  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = async (why: string) => {
      if (stopping) {
        // A second signal: leave now.
        process.exit(1);
      }
      stopping = true;
      log.info(`stopping: ${why}`);
      await server.close(config.shutdownTimeoutSeconds * 1000);
      try {
        await node.close();
      } catch (err) {
        log.error(`closing the image failed: ${err instanceof Error ? err.message : String(err)}`);
      }
      if (config.pidFile !== undefined) fs.rmSync(config.pidFile, { force: true });
      resolve();
    };
    server.on('idle', () => void stop('last client disconnected'));
    process.on('SIGTERM', () => void stop('SIGTERM'));
    process.on('SIGINT', () => void stop('SIGINT'));
  });
}
