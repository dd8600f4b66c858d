// The backend of a Backstage app, as `npx @backstage/create-app` (0.9.2) writes
// packages/backend/src/index.ts, trimmed to the plugins Backchat touches: the
// app backend (serves the frontend bundle, injects its config), the proxy and
// the catalog. Run by tests/harness/backstage_backend.py from a copy in
// <app>/packages/backend.
'use strict';

const { createBackend } = require('@backstage/backend-defaults');
const { coreServices, createBackendModule, createBackendPlugin } = require('@backstage/backend-plugin-api');
const { catalogProcessingExtensionPoint } = require('@backstage/plugin-catalog-node');

const backend = createBackend();

backend.add(import('@backstage/plugin-app-backend'));
backend.add(import('@backstage/plugin-proxy-backend'));
backend.add(import('@backstage/plugin-catalog-backend'));

// --- For the tests only (not in create-app's backend) ----------------------------------
// The catalog's processing errors, made visible. An entity whose processing fails
// before it ever succeeded is never stitched: a catalog file the catalog drops (an
// entity of a kind its location does not allow, a missing file) leaves no entity, no
// status and no log line behind. This module only observes: it records what the catalog
// reports through its processing extension point (the hook the unprocessed-entities
// module and event publishers use), logs it, and GET /api/backchat-tests/processing-errors
// returns it (credentials required, as for any plugin).
const processingErrors = [];

backend.add(createBackendModule({
  pluginId: 'catalog',
  moduleId: 'backchat-tests-processing-errors',
  register(env) {
    env.registerInit({
      deps: { catalog: catalogProcessingExtensionPoint, logger: coreServices.logger },
      async init({ catalog, logger }) {
        catalog.setOnProcessingErrorHandler(({ unprocessedEntity, errors }) => {
          const { kind, metadata = {}, spec = {} } = unprocessedEntity;
          const entityRef = `${String(kind).toLowerCase()}:${metadata.namespace ?? 'default'}/${metadata.name}`;
          const record = {
            entityRef,
            target: spec.target ?? null,
            errors: errors.map(error => ({ name: error.name, message: error.message })),
          };
          processingErrors.push(record);
          logger.warn(`Processing of ${entityRef} failed: ${record.errors.map(e => `${e.name}: ${e.message}`).join('; ')}`);
        });
      },
    });
  },
}));

backend.add(createBackendPlugin({
  pluginId: 'backchat-tests',
  register(env) {
    env.registerInit({
      deps: { httpRouter: coreServices.httpRouter },
      async init({ httpRouter }) {
        httpRouter.use((req, res, next) => {
          if (req.method === 'GET' && req.path === '/processing-errors') {
            res.json(processingErrors);
          } else {
            next();
          }
        });
      },
    });
  },
}));

backend.start();
