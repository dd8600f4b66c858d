// Shared by the scripts here: modules come from the cached install that
// tests/test_backstage_tooling.py made (BACKCHAT_NPM_ROOT), not from this directory.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { createRequire } = require('node:module');

const root = process.env.BACKCHAT_NPM_ROOT;
if (!root) {
  console.error('BACKCHAT_NPM_ROOT is not set (the directory holding node_modules)');
  process.exit(2);
}
const npmRequire = createRequire(path.join(root, 'package.json'));

// A module as a given package sees it (e.g. the helmet that backend-defaults uses).
function requireFrom(pkg, id) {
  return createRequire(npmRequire.resolve(`${pkg}/package.json`))(id);
}

// A file inside a package that its "exports" do not expose.
function requireInternal(pkg, file) {
  return require(path.join(path.dirname(npmRequire.resolve(`${pkg}/package.json`)), file));
}

// Config files merged the way Backstage merges them (objects deep-merge, arrays replace).
function readConfig(files) {
  const YAML = npmRequire('yaml');
  const { ConfigReader } = npmRequire('@backstage/config');
  return ConfigReader.fromConfigs(
    files.map(file => ({ context: path.basename(file), data: YAML.parse(fs.readFileSync(file, 'utf8')) ?? {} })),
  );
}

function argValues(argv, flag) {
  const values = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === flag) values.push(argv[++i]);
  }
  return values;
}

module.exports = { npmRequire, requireFrom, requireInternal, readConfig, argValues };
