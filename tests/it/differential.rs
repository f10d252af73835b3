//! The two lanes answer alike: a table of requests — every kind of app (one_factor, two_factor, bypass, a group
//! restriction, path rules, the `*` app), sessions signed in with the password, with two factors, still owing the
//! second factor, logged out, forged or absent, Hosts that are not hosts, dot segments and encoded tricks, the
//! portal's prefix, and spoofed identity and forwarding headers — is sent once on the HTTP/1.1 relay (a bodyless
//! GET or HEAD) and once on hyper's path (the same bytes plus `Content-Length: 0`), one request per connection.
//! For every case both lanes must give the same status, the same `Location` and `Content-Type`, and either both
//! leave the app untouched or both hand it the same request: method, target and every header, compared whole.
//!
//! No header is left out of that comparison, not even `content-length`: neither lane forwards the steering
//! `Content-Length: 0` of a GET or HEAD (the gateway writes a request's framing itself, and a bodyless GET or HEAD
//! gets none), so the app can't tell the lanes apart and any header that differs is a finding.
//!
//! Every case also proves which lane served it, on the relay's counters: on hyper's lane the request was handed
//! over; on the relay's it was either relayed to the app or answered by the gateway's handlers on the relay's
//! connection (never handed over), except the few cases the relay leaves to hyper by design, each marked with why.
//! Requests with a body are not in the table: the relay forwards a POST with a `Content-Length` body itself, and
//! steering one to hyper would change its framing, so a GET or HEAD is the one request both lanes can take as is.
//!
//! The expected status of each case is part of the table too, so the table can't quietly drift into testing two
//! identical refusals (a session that stopped working, an app that stopped answering).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::support::*;

/// one_factor.
const ONE: &str = "one.test";
/// two_factor.
const TWO: &str = "two.test";
/// bypass.
const OPEN: &str = "open.test";
/// one_factor, for the group `admins` only.
const ADMINS: &str = "admins.test";
/// one_factor with rules: `/private/` deny, `/public/` bypass, `/public/vault/` deny.
const RULED: &str = "ruled.test";

/// Values the spoofing cases send; none may reach the app.
const SPOOFED: &[&str] = &["mallory", "6.6.6.6", "spoofed.test", "/evil"];

// ---------------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------------

/// What the relay lane does with a case.
#[derive(Debug, Clone, Copy)]
enum Route {
    /// The relay relays it (when the app gets it) or has the gateway's handlers answer it on its connection.
    Relay,
    /// The relay parses it but the handlers answer it, and they forward it to the app themselves (why).
    Handlers(&'static str),
    /// The relay leaves it to hyper by design (why): the relay lane is hyper's lane too.
    Handover(&'static str),
}

/// One request of the table. Its text may name sessions, expanded when it is sent: `{S}` the session cookie's
/// name, `{alice}` (password), `{bob}` (two factors), `{pending}` (bob owing his second factor), `{revoked}`
/// (carol's, logged out), `{fresh}` (a new sign-in of dave's, made just before the request on each lane, so no
/// lane finds it cached).
#[derive(Debug, Clone)]
struct Case {
    what: &'static str,
    method: &'static str,
    version: &'static str,
    /// `None`: no Host line.
    host: Option<String>,
    target: String,
    /// Header lines (without CRLF).
    lines: Vec<String>,
    /// Tokens added to `Connection: close`.
    connection: &'static str,
    want: Want,
    route: Route,
}

/// The status a case must get on both lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Not said yet (no case of the table is left so).
    Unset,
    Status(u16),
}

impl Case {
    fn get(what: &'static str, host: &str, target: &str) -> Case {
        Case {
            what,
            method: "GET",
            version: "HTTP/1.1",
            host: Some(host.to_string()),
            target: target.to_string(),
            lines: Vec::new(),
            connection: "",
            want: Want::Unset,
            route: Route::Relay,
        }
    }
    fn head(what: &'static str, host: &str, target: &str) -> Case {
        Case { method: "HEAD", ..Case::get(what, host, target) }
    }
    fn method(mut self, m: &'static str) -> Case {
        self.method = m;
        self
    }
    fn version(mut self, v: &'static str) -> Case {
        self.version = v;
        self
    }
    fn no_host(mut self) -> Case {
        self.host = None;
        self
    }
    /// Sends the session `who` (a placeholder such as `{alice}`, or any value) as the only cookie.
    fn who(self, who: &str) -> Case {
        self.with(&format!("Cookie: {{S}}={who}"))
    }
    fn with(mut self, line: &str) -> Case {
        self.lines.push(line.to_string());
        self
    }
    /// As a browser: `Accept: text/html`.
    fn html(self) -> Case {
        self.with("Accept: text/html,application/xhtml+xml,*/*;q=0.8")
    }
    fn connection(mut self, tokens: &'static str) -> Case {
        self.connection = tokens;
        self
    }
    fn want(mut self, status: u16) -> Case {
        self.want = Want::Status(status);
        self
    }
    fn route(mut self, r: Route) -> Case {
        self.route = r;
        self
    }

    /// The request's bytes on `lane`, with the sessions expanded.
    fn text(&self, lane: Lane, s: &Sessions, fresh: &str) -> String {
        let mut t = format!("{} {} {}\r\n", self.method, self.target, self.version);
        if let Some(h) = &self.host {
            t.push_str(&format!("Host: {h}\r\n"));
        }
        for l in &self.lines {
            t.push_str(l);
            t.push_str("\r\n");
        }
        for (k, v) in lane.headers() {
            t.push_str(&format!("{k}: {v}\r\n"));
        }
        let tokens = if self.connection.is_empty() { String::new() } else { format!(", {}", self.connection) };
        t.push_str(&format!("Connection: close{tokens}\r\n\r\n"));
        t.replace("{S}", SESSION)
            .replace("{alice}", &s.alice)
            .replace("{bob}", &s.bob)
            .replace("{pending}", &s.pending)
            .replace("{revoked}", &s.revoked)
            .replace("{fresh}", fresh)
    }
}

fn table() -> Vec<Case> {
    let handover_target = Route::Handover("the relay takes origin-form targets of plain RFC 3986 bytes only");
    let many: Vec<String> = (0..70).map(|i| format!("X-Many-{i}: {i}")).collect();
    let mut too_many = Case::get("70 header lines (more than the relay parses)", OPEN, "/many")
        .want(200)
        .route(Route::Handover("more header lines than the relay parses (64)"));
    too_many.lines = many;
    vec![
        // A one_factor app and every kind of session.
        Case::get("no session, API client", ONE, "/").want(401),
        Case::get("no session, browser", ONE, "/page?q=1").html().want(302),
        Case::head("no session, browser HEAD", ONE, "/h").html().want(302),
        Case::head("no session, API HEAD", ONE, "/h").want(401),
        Case::get("no session, Accept without text/html", ONE, "/").with("Accept: application/json").want(401),
        Case::get("password session", ONE, "/page/1?q=1&x=a%20b").who("{alice}").want(200),
        Case::head("password session, HEAD", ONE, "/head").who("{alice}").want(200),
        Case::get("two-factor session", ONE, "/").who("{bob}").want(200),
        Case::get("pending session, API client", ONE, "/").who("{pending}").want(401),
        Case::get("pending session, browser", ONE, "/x?y=1").who("{pending}").html().want(302),
        Case::get("revoked session, API client", ONE, "/").who("{revoked}").want(401),
        Case::get("revoked session, browser", ONE, "/r").who("{revoked}").html().want(302),
        Case::get("garbage session cookie", ONE, "/").who("garbage").want(401),
        Case::get("garbage session cookie, browser", ONE, "/g").who("garbage").html().want(302),
        Case::get("a session never cached", ONE, "/fresh").who("{fresh}").want(200),
        // A two_factor app.
        Case::get("two_factor app, password session", TWO, "/").who("{alice}").want(401),
        Case::get("two_factor app, password session, browser", TWO, "/deep?a=b").who("{alice}").html().want(302),
        Case::get("two_factor app, two-factor session", TWO, "/").who("{bob}").want(200),
        Case::get("two_factor app, pending session, browser", TWO, "/p").who("{pending}").html().want(302),
        Case::get("two_factor app, no session", TWO, "/").want(401),
        // A bypass app.
        Case::get("bypass app, no session", OPEN, "/anything").want(200),
        Case::get("bypass app, with a session (no identity sent)", OPEN, "/").who("{alice}").want(200),
        Case::head("bypass app, revoked session, HEAD", OPEN, "/x").who("{revoked}").want(200),
        // An app for the group admins.
        Case::get("group app, user not in the group", ADMINS, "/").who("{alice}").want(403),
        Case::get("group app, user in the group", ADMINS, "/").who("{bob}").want(200),
        Case::get("group app, spoofed groups", ADMINS, "/")
            .who("{alice}")
            .with("Remote-Groups: admins")
            .with("Remote-User: mallory")
            .want(403),
        Case::get("group app, no session, browser", ADMINS, "/").html().want(302),
        // Rules.
        Case::get("deny rule, with a session", RULED, "/private/x").who("{alice}").want(403),
        Case::get("deny rule, no session", RULED, "/private/x").want(403),
        Case::get("bypass rule", RULED, "/public/x").want(200),
        Case::get("deny rule inside a bypass rule", RULED, "/public/vault/x").want(403),
        Case::get("dot segments into a deny rule", RULED, "/public/../private/x").want(403),
        Case::get("encoded dot segments into a deny rule", RULED, "/public/%2e%2e/private/x").want(403),
        Case::get("dot segments into a deny rule, browser", RULED, "/public/x/../../private/y").html().want(403),
        Case::get("upper case against a deny rule", RULED, "/PRIVATE/x").who("{alice}").want(403),
        Case::get("path parameters against a deny rule", RULED, "/private;x=1/y").who("{alice}").want(403),
        Case::get("an encoded letter against a deny rule", RULED, "/%70rivate/x").who("{alice}").want(403),
        Case::get("doubled slashes into a bypass rule", RULED, "//public//x").want(200),
        Case::get("upper case doesn't inherit a bypass", RULED, "/PUBLIC/x").want(401),
        Case::get("a dot segment and an encoded query", RULED, "/public/./x?q=%2e%2e&r=/../").want(200),
        Case::get("an encoded slash", RULED, "/public/..%2fprivate/x").want(400),
        Case::get("above the root", ONE, "/..").who("{alice}").want(400),
        Case::get("an encoded NUL", ONE, "/a%00b").who("{alice}").want(400),
        Case::get("an encoded slash on a bypass app", OPEN, "/a%2Fb").want(400),
        Case::get("encoded unreserved and UTF-8", OPEN, "/caf%C3%A9/%7Euser/%41").want(200),
        Case::get("an empty query", OPEN, "/?").want(200),
        Case::get("a query that is not valid percent-encoding", OPEN, "/q?a=%zz&b").want(200),
        // Hosts.
        Case::get("unknown host: the * app", "elsewhere.test", "/").want(401),
        Case::get("unknown host with a port, signed in", "elsewhere.test:8080", "/x").who("{alice}").want(200),
        Case::get("IPv6 literal host", "[::1]:8080", "/v6").who("{alice}").want(200),
        Case::get("upper case and a trailing dot", "ONE.TEST.", "/").who("{alice}").want(200),
        Case::get("the default port", "one.test:80", "/").who("{alice}").want(200),
        Case::get("a bypass host with a port, upper case", "OPEN.TEST:8080", "/p").want(200),
        Case::get("bad Host: two trailing dots", "one.test..", "/").who("{alice}").want(400),
        Case::get("bad Host: port not a number", "one.test:abc", "/").who("{alice}").want(400),
        Case::get("bad Host: leading dot", ".one.test", "/").who("{alice}").want(400),
        Case::get("bad Host: empty label", "one..test", "/").want(400),
        Case::get("bad Host: unclosed IPv6 literal", "[::1", "/").want(400),
        Case::get("bad Host: empty", "", "/").who("{alice}").want(400),
        Case::get("bad Host on a bypass app's name", "open.test:99999999", "/").want(400),
        Case::get("bad Host on the portal's path", "one.test..", "/_portcullis/health").want(400),
        // The portal.
        Case::get("portal health", ONE, "/_portcullis/health").want(200),
        Case::head("portal health, HEAD, unknown host", "elsewhere.test", "/_portcullis/health").want(200),
        Case::get("portal login page", ONE, "/_portcullis/login?rd=%2F").html().want(200),
        Case::get("portal: no such page", ONE, "/_portcullis/nope").want(404),
        Case::get("portal prefix with dot segments", ONE, "/_portcullis/../private").who("{alice}").want(404),
        Case::get("admin pages, not an admin", ONE, "/_portcullis/admin/").who("{alice}").html().want(403),
        Case::get("the portal's prefix encoded goes to the app", ONE, "/%5fportcullis/health").who("{alice}").want(200),
        // Spoofed identity and forwarding headers.
        Case::get("spoofed identity headers, signed in", ONE, "/spoof")
            .who("{alice}")
            .with("Remote-User: mallory")
            .with("remote_user: mallory")
            .with("X-Remote-User: mallory")
            .with("Remote.Email: mallory@example.com")
            .with("X-Forwarded-User: mallory")
            .with("X-Auth-Request-User: mallory")
            .want(200),
        Case::get("spoofed identity headers on a bypass app", OPEN, "/spoof")
            .with("Remote-User: mallory")
            .with("REMOTE_GROUPS: admins")
            .with("X_Forwarded_Email: mallory@example.com")
            .want(200),
        Case::get("a spoofed identity is no session", ONE, "/").with("Remote-User: alice").want(401),
        Case::get("spoofed forwarding headers, signed in", ONE, "/fwd")
            .who("{alice}")
            .with("X-Forwarded-For: 6.6.6.6")
            .with("X-Real-IP: 6.6.6.6")
            .with("X-Forwarded-Host: spoofed.test")
            .with("X-Forwarded-Proto: https")
            .with("X-Forwarded-Prefix: /evil")
            .with("Forwarded: for=6.6.6.6;host=spoofed.test;proto=https")
            .want(200),
        Case::get("spoofed forwarding header variants on a bypass app", OPEN, "/fwd")
            .with("X_Forwarded_For: 6.6.6.6")
            .with("X.Real.IP: 6.6.6.6")
            .with("x-forwarded-host: spoofed.test")
            .with("X-Forwarded-Port: 8443")
            .want(200),
        Case::get("connection-listed and hop-by-hop headers", OPEN, "/conn")
            .connection("X-Secret")
            .with("X-Secret: mallory")
            .with("Keep-Alive: timeout=5")
            .with("TE: trailers")
            .with("Proxy-Connection: keep-alive")
            .with("X-Kept: yes")
            .want(200),
        // Cookies.
        Case::get("the app's cookies around the session's", ONE, "/cookies")
            .with("Cookie: a=1; {S}={alice}; b=2")
            .with("Cookie: c=3")
            .want(200),
        Case::get("the gateway's cookies never reach a bypass app", OPEN, "/cookies")
            .with("Cookie: {S}=x; portcullis_session_csrf=y; theme=dark")
            .want(200),
        Case::get("a forged session cookie before a valid one", ONE, "/")
            .with("Cookie: {S}=garbage; {S}={alice}")
            .want(200),
        Case::get("a revoked session cookie before a cached one", ONE, "/")
            .with("Cookie: {S}={revoked}; {S}={alice}")
            .want(200),
        // Both lanes try every session cookie value that verifies (the relay's `warm`, hyper's path through
        // `Sessions::authenticate_cached`): a logged-out session's cookie before a live one not yet cached used to
        // be a 401 on hyper's lane alone.
        Case::get("a revoked session cookie before one never cached", ONE, "/second")
            .with("Cookie: {S}={revoked}; {S}={fresh}")
            .want(200),
        Case::get("a forged session cookie before one never cached", ONE, "/third")
            .with("Cookie: {S}=garbage; {S}={fresh}")
            .want(200),
        Case::get("a pending session cookie before a full one", ONE, "/")
            .with("Cookie: {S}={pending}; {S}={bob}")
            .want(401),
        Case::get("five session cookies, the valid one last", ONE, "/five")
            .with("Cookie: {S}=a; {S}=b; {S}=c; {S}=d; {S}={alice}")
            .want(200)
            .route(Route::Handlers("more session cookies than the relay looks up (4): the handlers decide")),
        // What the relay leaves to hyper: both lanes are hyper's, and must still agree.
        Case::get("absolute-form target", ONE, "http://one.test/abs").who("{alice}").want(200).route(handover_target),
        Case::get("absolute-form target naming another app than Host", ONE, "http://open.test/abs")
            .want(200)
            .route(handover_target),
        Case::get("HTTP/1.0", OPEN, "/old").version("HTTP/1.0").want(200).route(Route::Handover("HTTP/1.0 is hyper's")),
        // RFC 9112 §3.2: an HTTP/1.1 request without a Host, or with two, is a 400.
        Case::get("no Host", "", "/nohost")
            .no_host()
            .who("{alice}")
            .want(400)
            .route(Route::Handover("a request without exactly one Host is hyper's")),
        Case::get("two Host lines", OPEN, "/twohosts")
            .with("Host: one.test")
            .want(400)
            .route(Route::Handover("a request without exactly one Host is hyper's")),
        Case::get("a quote in the target", OPEN, "/a\"b").want(200).route(handover_target),
        Case::get("a fragment in the target", OPEN, "/frag#x").want(200).route(handover_target),
        Case::get("an upgrade other than WebSocket", OPEN, "/up")
            .connection("Upgrade")
            .with("Upgrade: h2c")
            .want(200)
            .route(Route::Handover("upgrades other than WebSocket are hyper's")),
        Case::get("a Host that is not text", "open.t\u{ff}st", "/bytes")
            .want(401)
            .route(Route::Handover("a Host the relay can't read as text is hyper's")),
        Case::get("a 17 KiB header line", OPEN, "/long")
            .with(&format!("X-Long: {}", "v".repeat(17 * 1024)))
            .want(200)
            .route(Route::Handover("a head longer than 16 KiB is hyper's")),
        too_many,
        Case::get("a method the relay doesn't take", OPEN, "/dav")
            .method("PROPFIND")
            .want(200)
            .route(Route::Handover("methods other than GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS are hyper's")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

/// The session cookie values the cases use.
struct Sessions {
    alice: String,
    bob: String,
    pending: String,
    revoked: String,
}

/// What the app received.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    headers: BTreeMap<String, Vec<String>>,
}

/// What one lane made of a case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    status: u16,
    location: Option<String>,
    content_type: Option<String>,
    /// The requests the app received for it (none, or one).
    upstream: Vec<Seen>,
}

/// The relay's counters: relayed, handed over to hyper, answered by the handlers on the relay's connection; and
/// the requests recorded as ended (`portcullis_requests_total`, every app and status), which must move by one
/// whichever lane served the request: each request ends in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Served {
    relayed: u64,
    handovers: u64,
    local: u64,
    recorded: u64,
}

impl std::ops::Sub for Served {
    type Output = Served;
    fn sub(self, o: Served) -> Served {
        Served {
            relayed: self.relayed - o.relayed,
            handovers: self.handovers - o.handovers,
            local: self.local - o.local,
            recorded: self.recorded - o.recorded,
        }
    }
}

/// The three counters, from one scrape of the metrics endpoint (they count a request before it is answered).
async fn served(maddr: SocketAddr) -> Served {
    let s = Scrape::of(maddr).await;
    Served {
        relayed: s.value("portcullis_relayed_requests_total"),
        handovers: s.value("portcullis_relay_handovers_total"),
        local: s.value("portcullis_relay_local_answers_total"),
        recorded: s.sum("portcullis_requests_total"),
    }
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// A password sign-in of `user`; its session cookie's value.
async fn sign_in(gw: &Gateway, user: &str) -> String {
    let mut c = gw.client(ONE);
    c.login_ok(user, PW).await;
    c.session_cookie().unwrap()
}

/// Sends `case` on `lane` on a new connection: the request sent, its outcome and how the counters moved.
async fn run(
    gw: &Gateway,
    up: &Upstream,
    maddr: SocketAddr,
    s: &Sessions,
    case: &Case,
    lane: Lane,
) -> (String, Outcome, Served) {
    let fresh = match case.lines.iter().any(|l| l.contains("{fresh}")) {
        true => sign_in(gw, "dave").await,
        false => String::new(),
    };
    let text = case.text(lane, s, &fresh);
    let hits = up.hit_count();
    let before = served(maddr).await;
    let r = raw_send(gw.addr, text.as_bytes()).await;
    // The relay records a request once its answer is written, so the client may read it a moment earlier.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let moved = loop {
        let moved = served(maddr).await - before;
        if moved.recorded > 0 || std::time::Instant::now() > deadline {
            break moved;
        }
        tokio::task::yield_now().await;
    };
    let upstream = up.hits()[hits..]
        .iter()
        .map(|h| Seen { method: h.method.clone(), target: h.path.clone(), headers: h.headers.clone() })
        .collect();
    let outcome = Outcome {
        status: r.status,
        location: header_of(&r.head, "location"),
        content_type: header_of(&r.head, "content-type"),
        upstream,
    };
    (text, outcome, moved)
}

/// How the counters must move for `case` on `lane` with `outcome`; `None` when they did.
fn lane_error(case: &Case, lane: Lane, outcome: &Outcome, moved: Served) -> Option<String> {
    let reached = !outcome.upstream.is_empty();
    let want = match (lane, case.route) {
        (Lane::Hyper, _) | (Lane::Relay, Route::Handover(_)) => {
            Served { relayed: 0, handovers: 1, local: 0, recorded: 1 }
        }
        (Lane::Relay, Route::Handlers(_)) => Served { relayed: 0, handovers: 0, local: 1, recorded: 1 },
        (Lane::Relay, Route::Relay) if reached => Served { relayed: 1, handovers: 0, local: 0, recorded: 1 },
        (Lane::Relay, Route::Relay) => Served { relayed: 0, handovers: 0, local: 1, recorded: 1 },
    };
    let why = match case.route {
        Route::Relay => "relayed, or answered by the handlers on the relay's connection",
        Route::Handlers(why) | Route::Handover(why) => why,
    };
    (moved != want).then(|| format!("on the {lane:?} lane the relay counters moved by {moved:?}, not {want:?} ({why})"))
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_of_the_table_gets_the_same_answer_and_reaches_the_app_the_same_on_both_lanes() {
    let up = start_upstream().await;
    let u = up.url();
    let (maddr, metrics) = metrics_section();
    let ruled = format!(
        "{}[[app.rule]]\npath = \"/private/\"\npolicy = \"deny\"\n\n[[app.rule]]\npath = \"/public/\"\n\
         policy = \"bypass\"\n\n[[app.rule]]\npath = \"/public/vault/\"\npolicy = \"deny\"\n\n",
        app(RULED, &u, "one_factor")
    );
    let env = Env::password_only(&format!(
        "{metrics}{}{}{}{}groups = [\"admins\"]\n\n{ruled}{}",
        app(ONE, &u, "one_factor"),
        app(TWO, &u, "two_factor"),
        app(OPEN, &u, "bypass"),
        app(ADMINS, &u, "one_factor"),
        app("*", &u, "one_factor"),
    ));
    // All accounts before the start: a CLI change wakes the gateway (and on PostgreSQL empties its cache).
    env.add_user("alice", "alice@example.com", "Alice Liddell", &["staff"], PW).await;
    env.add_user("bob", "bob@example.com", "Bob Builder", &["admins", "staff"], PW).await;
    env.add_user("carol", "carol@example.com", "Carol", &[], PW).await;
    env.add_user("dave", "dave@example.com", "Dave", &[], PW).await;
    let gw = env.start().await;

    let alice = sign_in(&gw, "alice").await;
    // bob turns on two-factor from his password session, which then counts as a two-factor one ...
    let mut b = gw.client(ONE);
    b.login_ok("bob", PW).await;
    let page = signed_in_setup_page(&mut b, PW).await;
    let clock = gw.clock.clone();
    confirm_setup_page(&mut b, &page, "/", || portcullis::clock::Clock::now(&*clock)).await;
    let bob = b.session_cookie().expect("bob's session after enrolling");
    // ... and signs in again elsewhere with his password only: that session owes the second factor.
    let mut p = gw.client(ONE);
    login_to_challenge_loc(&mut p, "bob", PW, "/").await;
    let pending = p.session_cookie().expect("bob's pending session");
    let mut c = gw.client(ONE);
    c.login_ok("carol", PW).await;
    let revoked = c.session_cookie().unwrap();
    logout(&mut c).await;
    let s = Sessions { alice, bob, pending, revoked };

    let cases = table();
    assert!(cases.len() >= 50, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (relay_req, relay, relay_moved) = run(&gw, &up, maddr, &s, case, Lane::Relay).await;
        let (hyper_req, hyper, hyper_moved) = run(&gw, &up, maddr, &s, case, Lane::Hyper).await;
        let mut wrong = Vec::new();
        if relay != hyper {
            wrong.push("the lanes disagree".to_string());
        }
        match case.want {
            Want::Status(w) if relay.status != w || hyper.status != w => {
                wrong.push(format!("the table wants status {w}"));
            }
            Want::Unset => wrong.push("the table gives no status".to_string()),
            _ => {}
        }
        if relay.upstream.len() > 1 || hyper.upstream.len() > 1 {
            wrong.push("the app got more than one request".to_string());
        }
        wrong.extend(lane_error(case, Lane::Relay, &relay, relay_moved));
        wrong.extend(lane_error(case, Lane::Hyper, &hyper, hyper_moved));
        for seen in relay.upstream.iter().chain(&hyper.upstream) {
            for (name, values) in &seen.headers {
                for v in values {
                    if let Some(bad) = SPOOFED.iter().find(|bad| v.contains(**bad)) {
                        wrong.push(format!("the app got {name}: {v} (spoofed {bad:?})"));
                    }
                }
            }
        }
        if !wrong.is_empty() {
            let shorten = |t: &str| t.chars().take(600).collect::<String>();
            failures.push(format!(
                "case {i} ({}): {}\n  relay request: {:?}\n  relay: {relay:?}\n  hyper request: {:?}\n  hyper: {hyper:?}",
                case.what,
                wrong.join("; "),
                shorten(&relay_req),
                shorten(&hyper_req),
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
    gw.stop().await;
}

/// Heads hyper refuses while parsing never reach the handlers: hyper answers them itself, and they are recorded all
/// the same, as the "unknown" app's (one place for every answer, see `Gateway::finished`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_hyper_answers_while_parsing_are_recorded_too() {
    let up = start_upstream().await;
    let (maddr, metrics) = metrics_section();
    let env = Env::password_only(&format!("{metrics}{}", app(ONE, &up.url(), "one_factor")));
    let gw = env.start().await;
    let many: String = (0..150).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    for (request, want) in [
        (format!("GET / HTTP/1.1\r\nHost: {ONE}\r\nNot a header line\r\n\r\n"), 400),
        (format!("GET / HTTP/1.1\r\nHost: {ONE}\r\n{many}\r\n"), 431),
    ] {
        let status = format!("status=\"{want}\"");
        let labels = ["app=\"unknown\"", status.as_str()];
        let before = Scrape::of(maddr).await.labelled("portcullis_requests_total", &labels);
        let r = raw_send(gw.addr, request.as_bytes()).await;
        assert_eq!(r.status, want, "{}", r.head);
        // Recorded as hyper's connection ends, which may be just after the client has read the answer.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let after = loop {
            let after = Scrape::of(maddr).await.labelled("portcullis_requests_total", &labels);
            if after > before || std::time::Instant::now() > deadline {
                break after;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(after, before + 1, "hyper's own {want} was not recorded once");
    }
}
