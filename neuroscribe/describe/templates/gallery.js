(function () {
  "use strict";
  // Search for neuroscribe's static gallery. No network: all data is in this page.
  var LIMIT = 500;
  var q = document.getElementById("q");
  var status = document.getElementById("status");
  var indexEl = document.getElementById("unit-index");
  var items = null;

  function terms() {
    return q.value.toLowerCase().split(/\s+/).filter(function (t) { return t.length > 0; });
  }
  function matches(text, ts) {
    for (var i = 0; i < ts.length; i++) { if (text.indexOf(ts[i]) < 0) { return false; } }
    return true;
  }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  function buildIndex() {
    // Rows are made with textContent only: descriptions are data, never markup.
    var data = JSON.parse(indexEl.textContent);
    var list = document.getElementById("results");
    items = data.units.map(function (u) {
      var li = document.createElement("li");
      li.hidden = true;
      li.className = "hit";
      li.setAttribute("data-layer", u.l);
      li.setAttribute("data-unit", String(u.u));
      var a = document.createElement("a");
      a.setAttribute("href", u.h);
      a.textContent = u.l + " · unit " + u.u;
      var d = document.createElement("span");
      d.className = "desc";
      d.textContent = u.d + (u.s === null ? "" : " (" + u.s + ")");
      li.appendChild(a);
      li.appendChild(d);
      list.appendChild(li);
      return { el: li, text: (u.d + "\n" + u.c + "\n" + u.l).toLowerCase() };
    });
  }

  function applyIndex() {
    var ts = terms();
    if (items === null) { if (ts.length === 0) { status.textContent = ""; return; } buildIndex(); }
    var n = 0, shown = 0;
    items.forEach(function (it) {
      var ok = ts.length > 0 && matches(it.text, ts);
      if (ok) { n++; }
      it.el.hidden = !(ok && shown < LIMIT);
      if (ok && shown < LIMIT) { shown++; }
    });
    status.textContent = ts.length === 0 ? "" :
      plural(n, "matching unit") + (n > shown ? " (first " + shown + " shown)" : "");
  }

  function applyLayer() {
    var ts = terms();
    var cards = document.querySelectorAll("[data-search]");
    var n = 0;
    Array.prototype.forEach.call(cards, function (el) {
      var ok = ts.length === 0 || matches(el.getAttribute("data-search"), ts);
      el.hidden = !ok;
      if (ok) { n++; }
    });
    status.textContent = ts.length === 0 ? "" : plural(n, "matching unit") + " of " + cards.length;
  }

  var apply = indexEl ? applyIndex : applyLayer;
  q.addEventListener("input", apply);
  var preset = new URLSearchParams(window.location.search).get("q");
  if (preset) { q.value = preset; }
  apply();
})();
