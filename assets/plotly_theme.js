// SpecLab: the Plotly figures follow the page's light/dark theme.
//
// The figures come from the server transparent, with plotly_white's light text and grid (visualizers/figures.py).
// Gradio marks a dark page with class "dark" on <body> (?__theme=dark, its settings, or the system's scheme);
// Gradio draws a figure with window.Plotly.react. This script (in the page's <head>, before Plotly loads) wraps
// Plotly's react/newPlot so that on a dark page each figure is drawn with light text and faint grid lines, and
// redraws the figures already on the page when the theme changes.
(() => {
  // (no axis linecolor: an explicit one turns the axis line on in plotly.js)
  const DARK = { font: "#e5e7eb", grid: "rgba(255,255,255,0.12)", zero: "rgba(255,255,255,0.28)" };
  const isDark = () => !!document.body && document.body.classList.contains("dark");
  const axes = (layout) => Object.keys(layout || {}).filter((k) => /^[xy]axis\d*$/.test(k));

  function darken(layout) { // a layout about to be drawn on a dark page
    if (!layout || typeof layout !== "object") return layout;
    layout.font = Object.assign({}, layout.font, { color: DARK.font });
    for (const a of axes(layout)) {
      layout[a] = Object.assign({}, layout[a], { gridcolor: DARK.grid, zerolinecolor: DARK.zero });
    }
    return layout;
  }

  function themeUpdate(layout, dark) { // a relayout for a figure already drawn; null: back to the template's value
    const u = { "font.color": dark ? DARK.font : null };
    for (const a of axes(layout)) {
      u[a + ".gridcolor"] = dark ? DARK.grid : null;
      u[a + ".zerolinecolor"] = dark ? DARK.zero : null;
    }
    return u;
  }

  function patch(P) {
    if (!P || P.__speclabTheme) return;
    for (const name of ["newPlot", "react"]) {
      const draw = P[name];
      if (typeof draw !== "function") continue;
      P[name] = function (gd, data, layout, config) {
        const dark = isDark();
        if (dark) {
          if (data && !Array.isArray(data) && typeof data === "object" && "data" in data) darken(data.layout);
          else layout = darken(layout);
        }
        if (gd && typeof gd === "object") gd.__speclabDark = dark;
        return draw.call(this, gd, data, layout, config);
      };
    }
    P.__speclabTheme = true;
  }

  let plotly = window.Plotly;
  patch(plotly);
  Object.defineProperty(window, "Plotly", {
    configurable: true,
    get: () => plotly,
    set: (v) => { plotly = v; patch(v); },
  });

  function follow() { // the theme changed: redraw the figures drawn for the other one
    if (!plotly) return;
    const dark = isDark();
    document.querySelectorAll(".js-plotly-plot").forEach((gd) => {
      if (gd.__speclabDark === dark || !gd.layout) return;
      gd.__speclabDark = dark;
      plotly.relayout(gd, themeUpdate(gd.layout, dark));
    });
  }

  function watch() {
    new MutationObserver(follow).observe(document.body, { attributes: true, attributeFilter: ["class"] });
    follow();
  }
  if (document.body) watch();
  else document.addEventListener("DOMContentLoaded", watch);
})();
