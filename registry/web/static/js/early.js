// A classic deferred script that runs before the modules: it starts the first data requests
// of the page being opened, so they travel while the modules are compiled and evaluated.
// api.js uses a started request once, for the same path (and the same token), then forgets it.
(() => {
  const token = sessionStorage.getItem("brickyard.token");
  const headers = token ? { Accept: "application/json", Authorization: `Bearer ${token}` } : { Accept: "application/json" };
  const [route, query] = (location.hash.replace(/^#/, "") || "/").split("?");
  const paths = [];
  if (route === "/" || route === "/search" || route === "/compose") paths.push("/v1/base-models");
  if (route === "/" && !query) paths.push("/v1/bricks?limit=50");
  if (route === "/compose") paths.push("/v1/merge-methods", "/v1/bricks?limit=200");
  window.brickyardEarly = { token, requests: Object.fromEntries(paths.map((p) => [p, fetch(p, { headers }).catch(() => null)])) };
})();
