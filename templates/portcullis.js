// Progressive enhancement for the recovery codes page: copy and print. Everything works without it.
(function () {
  var list = document.getElementById("codes");
  if (!list) return;
  var copy = document.getElementById("copy-codes");
  var print = document.getElementById("print-codes");
  var text = Array.prototype.map.call(list.querySelectorAll("li"), function (li) { return li.textContent; }).join("\n");
  if (copy && navigator.clipboard) {
    copy.hidden = false;
    copy.addEventListener("click", function () {
      navigator.clipboard.writeText(text).then(function () { copy.textContent = "Copied"; });
    });
  }
  if (print) {
    print.hidden = false;
    print.addEventListener("click", function () { window.print(); });
  }
})();
