// Verbatim from benwilcock/backstage-plugin-backchat @ f30cb41e (package
// @benbravo73/backstage-plugin-backchat 0.0.5), see docs/upstream-facts.md section 6.
export interface Config {
  ai_server?: {
    /**
     * @visibility frontend
     */
    url: string;
  };
}
