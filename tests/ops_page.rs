//! The live operator page (`GET /ops`, fed by `GET /api/live`) in a real headless Chromium
//! against a real gateway under load, and the live stream on its own.

mod common;

use std::time::Duration;

use common::browser::Browser;

/// The driver itself: values, awaited promises, exceptions with their text, two pages at once.
#[test]
fn browser_driver_evaluates_waits_and_reports_exceptions() {
    let browser = Browser::launch();
    let a = browser.new_page("data:text/html,<title>a</title><p id=x>hello</p>");
    let b = browser.new_page("data:text/html,<title>b</title>");
    assert_eq!(
        a.eval("document.getElementById('x').textContent").unwrap(),
        "hello"
    );
    assert_eq!(b.eval("document.title").unwrap(), "b");
    assert_eq!(
        a.eval("new Promise(r => setTimeout(() => r(41 + 1), 50))")
            .unwrap(),
        42
    );
    let err = a
        .eval("(() => { throw new Error('boom here') })()")
        .unwrap_err();
    assert!(err.contains("boom here"), "{err}");
    a.eval("console.log('logged', 7); setTimeout(() => { window.late = true }, 200)")
        .unwrap();
    a.wait_for("window.late === true", Duration::from_secs(10))
        .unwrap();
    let never = a.wait_for("false", Duration::from_millis(300)).unwrap_err();
    assert!(
        never.contains("logged 7"),
        "the failure shows the console: {never}"
    );
    b.eval("window.kept = 1").unwrap();
    b.reload();
    assert_eq!(
        b.eval("typeof window.kept").unwrap(),
        "undefined",
        "reload gave a new document"
    );
}
