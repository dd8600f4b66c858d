// Stand-in for a Backstage app bundle with the Backchat plugin's page
// (benwilcock/backstage-plugin-backchat): it reads the frontend config the way
// @backstage/core-app-api's default config loader does (the JSON arrays of
// <script type="backstage.io/config"> elements, later entries winning) and
// iframes ai_server.url exactly as the plugin does.
//
// For the browser tests it records, in window.backchat (the contract of
// tests/backstage/browser-check.js), what happened: the URL, whether the GUI
// in the iframe loaded (the GUI stand-in posts 'backchat-gui-loaded' to its
// parent) and any CSP violations.
'use strict';
(function () {
  var state = { configs: [], aiServerUrl: null, iframe: null, gui: null, frameLoadedAt: null, violations: [], error: null };
  var violatedAt = null;
  // Done: the GUI said hello, or a second passed since the frame loaded (something else)
  // or since the browser reported a CSP violation (a blocked frame may never load).
  function settled(since) { return since !== null && Date.now() - since > 1000; }
  window.backchat = {
    state: state,
    done: function () {
      return state.error !== null || state.gui !== null || settled(state.frameLoadedAt) || settled(violatedAt);
    },
  };
  document.addEventListener('securitypolicyviolation', function (e) {
    state.violations.push({ directive: e.effectiveDirective, blocked: e.blockedURI });
    if (violatedAt === null) violatedAt = Date.now();
  });
  window.addEventListener('message', function (e) {
    if (e.data === 'backchat-gui-loaded') state.gui = e.origin;
  });

  function readConfigs() {
    var configs = [];
    var elements = document.querySelectorAll('script[type="backstage.io/config"]');
    for (var i = 0; i < elements.length; i++) {
      var data = JSON.parse(elements[i].textContent);
      if (!Array.isArray(data)) throw new Error('backstage.io/config is not an array');
      configs.push.apply(configs, data);
    }
    return configs;
  }

  function lookup(configs, path) {
    for (var i = configs.length - 1; i >= 0; i--) {
      var value = configs[i].data;
      for (var j = 0; j < path.length && value !== undefined && value !== null; j++) value = value[path[j]];
      if (value !== undefined && value !== null) return value;
    }
    return undefined;
  }

  document.addEventListener('DOMContentLoaded', function () {
    try {
      state.configs = readConfigs();
      // The plugin: config.getOptionalString('ai_server.url') ?? 'http://localhost:3001'.
      state.aiServerUrl = lookup(state.configs, ['ai_server', 'url']) || null;
      var src = state.aiServerUrl || 'http://localhost:3001';
      var iframe = document.createElement('iframe');
      iframe.id = 'backchat';
      iframe.src = src;
      iframe.width = '800';
      iframe.height = '600';
      iframe.setAttribute('sandbox', 'allow-same-origin allow-scripts allow-popups allow-forms allow-modals');
      iframe.addEventListener('load', function () { state.frameLoadedAt = Date.now(); });
      document.getElementById('root').appendChild(iframe);
      state.iframe = { src: iframe.src, sandbox: iframe.getAttribute('sandbox') };
    } catch (e) {
      state.error = String(e);
    }
  });
})();
