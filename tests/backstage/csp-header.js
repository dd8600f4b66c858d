// Print, as JSON, the headers Backstage's backend sends for the given config files: the
// files merged by @backstage/config, backend.csp read by backend-defaults'
// readHelmetOptions, and the helmet middleware (the one backend-defaults depends on) run
// on a stub response, as rootHttpRouter's MiddlewareFactory.helmet() does.
//
//   node csp-header.js --config app-config.yaml --config app-config.local.yaml
'use strict';

const { requireFrom, requireInternal, readConfig, argValues } = require('./lib.js');

const helmet = requireFrom('@backstage/backend-defaults', 'helmet');
const { readHelmetOptions } = requireInternal(
  '@backstage/backend-defaults', 'dist/entrypoints/rootHttpRouter/http/readHelmetOptions.cjs.js');

const config = readConfig(argValues(process.argv.slice(2), '--config'));
const headers = {};
const response = {
  setHeader: (name, value) => { headers[name] = value; },
  removeHeader: name => { delete headers[name]; },
};
helmet(readHelmetOptions(config.getOptionalConfig('backend')))({}, response, error => {
  if (error) {
    console.error(error);
    process.exit(1);
  }
  process.stdout.write(JSON.stringify(headers, null, 2) + '\n');
});
