// The browser-test harness: starts Debian's Chromium with playwright-core,
// gives a scenario a fresh browser context, records every console error and
// uncaught page error, and reports a failure with everything needed to
// debug it (the error, the pages' console, a screenshot).
//
// A scenario is tests/browser/scenarios/<name>.mjs:
//
//   export default async function (ctx) {
//     const page = ctx.page;
//     await ctx.step("open the demo page", () => page.goto(ctx.env.SPILLWAY_URL + "/"));
//     ctx.expect((await page.title()).includes("Spillway"), "the title names Spillway");
//     ctx.assertNoErrors();
//   }
//
// tests/browser.rs starts the gateway and the host-page servers, then runs
// `node run.mjs <name>` with SCENARIO_ENV set; run.mjs calls `run` below.

import { mkdir } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));

/** Where `screenshot()` writes: committed, linked from the docs. */
export const SCREENSHOT_DIR = path.resolve(here, "../../docs/screenshots");
/** Where a failed run leaves its screenshots (git-ignored). */
export const ARTIFACT_DIR = path.resolve(here, "artifacts");

/** The whole run (launch, scenario, close) is cut off after this. */
const RUN_TIMEOUT_MS = Number(process.env.SCENARIO_TIMEOUT_MS || 60_000);
/** Each Playwright action or wait, unless it passes its own timeout. */
const ACTION_TIMEOUT_MS = 15_000;

// Debian's Chromium, never a downloaded one. Without the background
// networking flags it keeps dialling Google's hosts, which this machine's
// closed network refuses; --no-sandbox because tests run as root.
// playwright-core adds --headless itself (headless: true is its default).
const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

/**
 * What the Rust side tells the scenario: SCENARIO_ENV is a JSON object with
 * SPILLWAY_URL (the gateway's base URL, no trailing slash), HOST_ALLOWED_URL
 * and HOST_OTHER_URL (two host-page servers on two more origins, serving
 * tests/browser/pages/) and whatever the test added. For a run by hand the
 * same names may be plain environment variables instead.
 */
export const env = Object.freeze({
  ...pick(process.env, ["SPILLWAY_URL", "HOST_ALLOWED_URL", "HOST_OTHER_URL"]),
  ...JSON.parse(process.env.SCENARIO_ENV || "{}"),
});

function pick(source, names) {
  return Object.fromEntries(names.filter((n) => source[n]).map((n) => [n, source[n]]));
}

/** Throws (failing the scenario) unless `cond` holds. */
export function expect(cond, message) {
  if (!cond) throw new Error(`expectation failed: ${message}`);
}

/** Throws unless `actual` and `expected` are equal as JSON. */
export function expectEqual(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`expectation failed: ${what}\n  expected: ${e}\n  got:      ${a}`);
}

/**
 * Polls `fn` (sync or async) until it returns something truthy and returns
 * that. Throws after `timeout` ms, naming `what` and the last value or error.
 */
export async function waitFor(fn, { timeout = 10_000, interval = 100, what = "a condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
      last = `last value: ${JSON.stringify(value)}`;
    } catch (err) {
      last = `last error: ${err && err.message ? err.message : err}`;
    }
    if (Date.now() >= deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what} (${last})`);
    await new Promise((resolve) => setTimeout(resolve, interval));
  }
}

/** Saves a screenshot of `page` to docs/screenshots/<name>.png; returns the path. */
export async function screenshot(page, name) {
  if (!/^[a-z0-9][a-z0-9_-]*$/.test(name)) throw new Error(`screenshot name ${JSON.stringify(name)}: use [a-z0-9_-]`);
  await mkdir(SCREENSHOT_DIR, { recursive: true });
  const file = path.join(SCREENSHOT_DIR, `${name}.png`);
  await page.screenshot({ path: file });
  log(`  screenshot ${path.relative(path.resolve(here, "../.."), file)}`);
  return file;
}

function log(line) {
  process.stdout.write(line + "\n");
}

/** Launches Chromium the way every scenario gets it. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.SPILLWAY_TEST_CHROMIUM || "/usr/bin/chromium",
    args: CHROMIUM_ARGS,
    timeout: 30_000,
  });
}

/**
 * One scenario run: what a scenario function receives as `ctx`.
 *
 * Every page opened through it (ctx.page, ctx.newPage(), any context from
 * ctx.newContext(), popups too) has its console errors and page errors
 * recorded, so `assertNoErrors` and the failure report see all of them.
 */
class Run {
  constructor(name, browser) {
    this.name = name;
    this.browser = browser;
    this.env = env;
    /** Every page seen, in order, with what it reported. */
    this.pages = [];
    this.contexts = [];
    this.expect = expect;
    this.expectEqual = expectEqual;
    this.waitFor = waitFor;
    this.screenshot = screenshot;
  }

  /**
   * A fresh browser context: its own cookies and storage, like another
   * visitor or a private window. `options` go to browser.newContext.
   */
  async newContext(options = {}) {
    const context = await this.browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
    context.setDefaultTimeout(ACTION_TIMEOUT_MS);
    context.on("page", (page) => this.#watch(page));
    this.contexts.push(context);
    return context;
  }

  /** A new page in the scenario's first context (or in `context`). */
  async newPage(context = this.context) {
    return context.newPage();
  }

  #watch(page) {
    const entry = { page, label: `page ${this.pages.length + 1}`, consoleErrors: [], pageErrors: [], console: [], failedRequests: [] };
    this.pages.push(entry);
    page.on("console", (msg) => {
      const loc = msg.location();
      const where = loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : "";
      entry.console.push(`[${msg.type()}] ${msg.text()}${where}`);
      // Chromium asks every origin for /favicon.ico by itself; its 404 is
      // not the page's error.
      const favicon = loc && loc.url && new URL(loc.url, "http://x").pathname === "/favicon.ico";
      if (msg.type() === "error" && !favicon) entry.consoleErrors.push(`${msg.text()}${where}`);
    });
    page.on("pageerror", (err) => {
      entry.pageErrors.push(err.stack || String(err));
      entry.console.push(`[pageerror] ${err.message}`);
    });
    page.on("requestfailed", (req) => {
      entry.failedRequests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`);
    });
  }

  /** What `page` reported so far: { consoleErrors, pageErrors, console, failedRequests }. */
  errors(page = this.page) {
    const entry = this.pages.find((p) => p.page === page);
    if (!entry) throw new Error("that page was not opened through this run");
    return entry;
  }

  /** Fails unless no page (or just `page`) logged a console error or threw. */
  assertNoErrors(page) {
    const entries = page ? [this.errors(page)] : this.pages;
    const found = [];
    for (const e of entries) {
      for (const text of e.consoleErrors) found.push(`${e.label} console error: ${text}`);
      for (const text of e.pageErrors) found.push(`${e.label} page error: ${text}`);
    }
    if (found.length) throw new Error(`expectation failed: no console or page errors, but:\n  ${found.join("\n  ")}`);
  }

  /** Runs one named step and prints a line when it starts and ends. */
  async step(title, fn) {
    const started = Date.now();
    log(`  → ${title}`);
    const value = await fn();
    log(`  ✓ ${title} (${Date.now() - started} ms)`);
    return value;
  }
}

/**
 * Runs `scenario(ctx)` in a fresh browser under the overall timeout; prints
 * a line per step, and on failure the error, every page's console errors
 * and page errors, and saves a screenshot per open page to artifacts/.
 * Always closes the browser. Resolves to the exit code (0 or 1).
 */
export async function run(name, scenario) {
  const started = Date.now();
  log(`scenario ${name}: ${JSON.stringify(env)}`);
  let browser;
  let ctx;
  let timer;
  const body = async () => {
    browser = await launch();
    ctx = new Run(name, browser);
    ctx.context = await ctx.newContext();
    ctx.page = await ctx.context.newPage();
    await scenario(ctx);
  };
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`scenario ${name} did not finish within ${RUN_TIMEOUT_MS} ms`)), RUN_TIMEOUT_MS);
  });
  // Should closing hang too, nothing may keep CI waiting.
  const hardStop = setTimeout(() => {
    log(`scenario ${name}: the browser did not close; exiting`);
    process.exit(1);
  }, RUN_TIMEOUT_MS + 15_000);
  hardStop.unref();

  let code = 0;
  try {
    await Promise.race([body(), deadline]);
    log(`PASS ${name} (${Date.now() - started} ms)`);
  } catch (err) {
    code = 1;
    await report(name, ctx, err);
    log(`FAIL ${name} (${Date.now() - started} ms)`);
  } finally {
    clearTimeout(timer);
    if (browser) await browser.close().catch(() => {});
  }
  return code;
}

async function report(name, ctx, err) {
  log(`\nerror: ${err && err.stack ? err.stack : err}`);
  if (!ctx) return;
  await mkdir(ARTIFACT_DIR, { recursive: true });
  for (const [i, e] of ctx.pages.entries()) {
    let url = "(closed)";
    if (!e.page.isClosed()) url = e.page.url();
    log(`\n${e.label}: ${url}`);
    const section = (title, lines) => {
      if (lines.length) log(`  ${title}:\n    ${lines.slice(-50).join("\n    ")}`);
    };
    section("console errors", e.consoleErrors);
    section("page errors", e.pageErrors);
    section("failed requests", e.failedRequests);
    // The whole console, in order, when it says more than the errors.
    if (e.console.length > e.consoleErrors.length + e.pageErrors.length) section("console (last 50)", e.console);
    if (!e.page.isClosed()) {
      const file = path.join(ARTIFACT_DIR, `${name}-failure-${i + 1}.png`);
      try {
        await e.page.screenshot({ path: file, timeout: 5_000 });
        log(`  failure screenshot: ${path.relative(path.resolve(here, "../.."), file)}`);
      } catch (shotErr) {
        log(`  (no failure screenshot: ${shotErr.message})`);
      }
    }
  }
}
