// Progressive enhancement only: every page works without this script.
(function () {
  "use strict";
  var root = document.documentElement;
  var KEY = "bookdav.tz";

  function browserZone() {
    try { return Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { return ""; }
  }
  function remembered() {
    try { return window.localStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }
  function remember(zone) {
    try { window.localStorage.setItem(KEY, zone); } catch (e) { /* private mode */ }
  }

  // Booking pages shown in the provider's zone because the visitor chose none: show them in the
  // visitor's own (remembered, else detected) zone instead.
  if (root.getAttribute("data-zone-chosen") === "false") {
    var wanted = remembered() || browserZone();
    var select = document.getElementById("tz");
    var known = select && Array.prototype.some.call(select.options, function (o) { return o.value === wanted; });
    if (wanted && known && wanted !== root.getAttribute("data-zone")) {
      var url = new URL(window.location.href);
      url.searchParams.set("tz", wanted);
      window.location.replace(url.toString());
      return;
    }
  }

  var zoneSelect = document.getElementById("tz");
  if (zoneSelect && zoneSelect.form) {
    zoneSelect.form.addEventListener("submit", function () { remember(zoneSelect.value); });
  }

  Array.prototype.forEach.call(document.querySelectorAll("[data-copy]"), function (button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) { return; }
    button.hidden = false;
    button.addEventListener("click", function () {
      navigator.clipboard.writeText(source.value).then(function () {
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = "Copy"; }, 2000);
      });
    });
  });
})();
