// Inlined into the page's <head> (the CSP allows it by its hash): it starts the data requests
// of the view being opened while the page's script is still on its way, so a first visit pays
// one round of requests after the HTML, not two. The paths must be the ones the views ask for
// (api.js uses a started request once, for the same path and token, then forgets it); a path
// that differs is only a missed head start.
(() => {
  try {
    const token = sessionStorage.getItem("brickyard.token");
    const headers = token ? { Accept: "application/json", Authorization: `Bearer ${token}` } : { Accept: "application/json" };
    const [route, search = ""] = (decodeURI(location.hash.replace(/^#/, "")) || "/").split("?");
    const query = new URLSearchParams(search);
    const part = (value) => encodeURIComponent(decodeURIComponent(value));
    const routes = [
      [/^\/?$/, () => {
        const params = new URLSearchParams({ limit: "50" });
        if (query.get("base_model")) params.set("base_model", query.get("base_model"));
        if (query.get("tag")) params.set("tag", query.get("tag"));
        return ["/v1/base-models", `/v1/bricks?${params}`];
      }],
      [/^\/search$/, () => ["/v1/base-models"]],
      [/^\/compose$/, () => ["/v1/base-models", "/v1/merge-methods", "/v1/bricks?limit=200"]],
      [/^\/compositions$/, () => ["/v1/compositions?limit=50"]],
      [/^\/compositions\/([0-9a-f]{64})$/, (id) => [`/v1/compositions/${id}`, `/v1/compositions/${id}/files`]],
      [/^\/base-models\/([^/]+)$/, (name) => [`/v1/base-models/${part(name)}`]],
      [/^\/bricks\/([^/]+)(?:\/(\d+))?$/, (name, version) => {
        const brick = `/v1/bricks/${part(name)}`;
        return [version ? `${brick}/versions/${version}` : brick, `${brick}/versions?limit=100`, `${brick}/versions/${version || "latest"}/files`, `${brick}/history?limit=50`];
      }],
      [/^\/chat$/, () => ["/v1/chat/completions", "/v1/models"]],
    ];
    const match = routes.find(([pattern]) => pattern.test(route));
    const paths = match ? match[1](...route.match(match[0]).slice(1)) : [];
    window.brickyardEarly = { token, started: paths, requests: Object.fromEntries(paths.map((p) => [p, fetch(p, { headers }).catch(() => null)])) };
  } catch {
    // a malformed address: the view asks for its data itself
  }
})();
