#!/usr/bin/env node
// A native-solc-compatible front for npm's solc (wasm). Answers --version, --help,
// --standard-json (stdin -> stdout) and --combined-json, which is all py-solc-x and forge ask of solc.
// Imports not given inline are read from disk, relative to --base-path / --include-path / cwd.
'use strict';
const fs = require('fs');
const path = require('path');
const solc = require('solc');

const args = process.argv.slice(2);
const roots = [process.cwd()];
for (let i = 0; i < args.length; i++) {
  if ((args[i] === '--base-path' || args[i] === '--include-path') && args[i + 1]) roots.push(args[++i]);
  else if (args[i].startsWith('--base-path=') || args[i].startsWith('--include-path=')) roots.push(args[i].split('=')[1]);
}

function findImports(p) {
  for (const root of roots) {
    const full = path.isAbsolute(p) ? p : path.join(root, p);
    if (fs.existsSync(full)) return { contents: fs.readFileSync(full, 'utf8') };
  }
  return { error: 'File not found: ' + p };
}

function readStdin() {
  return fs.readFileSync(0, 'utf8');
}

if (args.includes('--version') || args.includes('-v')) {
  process.stdout.write('solc, the solidity compiler commandline interface\nVersion: ' + solc.version() + '\n');
} else if (args.includes('--help') || args.length === 0) {
  process.stdout.write('solc, the solidity compiler commandline interface\nVersion: ' + solc.version() +
    '\n\nUsage: solc --standard-json < input.json\n       solc --combined-json abi,bin file.sol...\n' +
    '  --version  --help  --standard-json  --combined-json  --base-path  --include-path  --allow-paths\n');
} else if (args.includes('--standard-json')) {
  process.stdout.write(solc.compile(readStdin(), { import: findImports }));
} else if (args.includes('--combined-json')) {
  combined();
} else {
  process.stderr.write('solc.js: unsupported arguments: ' + args.join(' ') + '\n');
  process.exit(1);
}

function combined() {
  const fields = args[args.indexOf('--combined-json') + 1].split(',');
  const files = args.filter((a) => a.endsWith('.sol'));
  const sources = {};
  for (const f of files) sources[f] = { content: fs.readFileSync(f, 'utf8') };
  const sel = { abi: 'abi', bin: 'evm.bytecode.object', 'bin-runtime': 'evm.deployedBytecode.object' };
  const evmIdx = args.indexOf('--evm-version');
  const input = {
    language: 'Solidity', sources,
    settings: {
      optimizer: { enabled: args.includes('--optimize'), runs: 200 },
      outputSelection: { '*': { '*': fields.map((f) => sel[f] || f) } },
      ...(evmIdx >= 0 ? { evmVersion: args[evmIdx + 1] } : {}),
    },
  };
  const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const errors = (out.errors || []).filter((e) => e.severity === 'error');
  if (errors.length) {
    for (const e of errors) process.stderr.write(e.formattedMessage + '\n');
    process.exit(1);
  }
  const contracts = {};
  for (const [file, cs] of Object.entries(out.contracts || {})) {
    for (const [name, c] of Object.entries(cs)) {
      const entry = {};
      if (fields.includes('abi')) entry.abi = c.abi;
      if (fields.includes('bin')) entry.bin = c.evm.bytecode.object;
      if (fields.includes('bin-runtime')) entry['bin-runtime'] = c.evm.deployedBytecode.object;
      contracts[file + ':' + name] = entry;
    }
  }
  process.stdout.write(JSON.stringify({ contracts, version: solc.version() }) + '\n');
}
