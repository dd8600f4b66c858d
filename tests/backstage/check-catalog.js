// Read a catalog file the way Backstage's catalog does and report, as JSON, what it makes
// of every entity: the file location reader and YAML parser, the catalog's default entity
// policies (@backstage/catalog-model), the built-in kind validators and relations, the
// catalog rules from the given config files, and each openapi definition checked by
// @apidevtools/swagger-parser.
//
//   node check-catalog.js --catalog FILE [--config app-config.yaml --config ...]
'use strict';

const path = require('node:path');
const { npmRequire, requireInternal, readConfig, argValues } = require('./lib.js');

const model = npmRequire('@backstage/catalog-model');
const { FileReaderProcessor, BuiltinKindsEntityProcessor } = npmRequire('@backstage/plugin-catalog-backend');
const { parseEntityYaml } = npmRequire('@backstage/plugin-catalog-node');
const { DefaultCatalogRulesEnforcer } = requireInternal(
  '@backstage/plugin-catalog-backend', 'dist/ingestion/CatalogRules.cjs.js');
const SwaggerParser = npmRequire('@apidevtools/swagger-parser');
const YAML = npmRequire('yaml');

async function main() {
  const argv = process.argv.slice(2);
  const catalog = path.resolve(argValues(argv, '--catalog')[0]);
  const configs = argValues(argv, '--config');
  const location = { type: 'file', target: catalog };

  // As CatalogBuilder.buildEntityPolicy() does by default.
  const policy = model.EntityPolicies.allOf([
    new model.SchemaValidEntityPolicy(),
    new model.DefaultNamespaceEntityPolicy(),
    new model.NoForeignRootFieldsEntityPolicy(),
    new model.FieldFormatEntityPolicy(model.makeValidator()),
  ]);
  const kinds = new BuiltinKindsEntityProcessor();
  const rules = configs.length ? DefaultCatalogRulesEnforcer.fromConfig(readConfig(configs)) : undefined;

  const results = [];
  await new FileReaderProcessor().readLocation(
    location, false, result => results.push(result),
    async function* parser({ data, location: where }) { yield* parseEntityYaml(data, where); },
  );

  const report = { errors: [], entities: [] };
  for (const result of results) {
    if (result.type === 'error') report.errors.push(String(result.error));
    if (result.type !== 'entity') continue;
    const entity = result.entity;
    const item = { kind: entity.kind, name: entity.metadata?.name, errors: [], relations: [] };
    try {
      item.ref = model.stringifyEntityRef(entity);
      const enforced = await policy.enforce(entity);
      if (!enforced) throw new Error('rejected by the entity policies');
      if (!(await kinds.validateEntityKind(entity))) throw new Error(`unsupported kind ${entity.kind}`);
      await kinds.postProcessEntity(entity, result.location, emitted => {
        if (emitted.type === 'relation') {
          const { type, source, target } = emitted.relation;
          if (model.stringifyEntityRef(source) === item.ref) {
            item.relations.push({ type, target: model.stringifyEntityRef(target) });
          }
        }
      });
    } catch (error) {
      item.errors.push(String(error.message ?? error));
    }
    if (rules) item.allowed = rules.isAllowed(entity, result.location);
    if (entity.kind === 'API' && entity.spec?.type === 'openapi') {
      try {
        const api = await SwaggerParser.validate(YAML.parse(entity.spec.definition));
        item.openapi = { valid: true, servers: (api.servers ?? []).map(s => s.url), paths: {} };
        for (const [p, ops] of Object.entries(api.paths)) item.openapi.paths[p] = Object.keys(ops);
      } catch (error) {
        item.openapi = { valid: false, error: String(error.message ?? error) };
      }
    }
    report.entities.push(item);
  }
  if (rules) {
    // What else the merged rules allow: their own global rules must still apply, and ours
    // must not have widened them to other locations.
    const elsewhere = { type: 'url', target: 'https://github.com/lab/repo/blob/main/catalog-info.yaml' };
    report.elsewhere = {};
    for (const kind of ['Component', 'API', 'Location', 'Template', 'System', 'Group', 'User']) {
      report.elsewhere[kind] = rules.isAllowed({ apiVersion: 'backstage.io/v1alpha1', kind, metadata: { name: 'x' } }, elsewhere);
    }
  }
  process.stdout.write(JSON.stringify(report, null, 2) + '\n');
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
