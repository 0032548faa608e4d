// What the widget scenarios share: reading the widget's shadow DOM from
// Playwright (its CSS selectors pierce open shadow roots) and waiting for
// an answer's text.

export const W = "spillway-chat";

/** Opens the launcher (unless open already) and waits until the chat can be used. */
export async function openWidget(page) {
  await page.waitForSelector(`${W} .launcher, ${W} .panel`, { state: "attached" });
  if (await page.locator(`${W} .panel`).isHidden()) await page.click(`${W} .launcher`);
  await ready(page);
}

/** Waits until the widget has its conversation (the message box is enabled). */
export async function ready(page) {
  await page.waitForFunction(() => {
    const root = document.querySelector("spillway-chat")?.shadowRoot;
    const input = root && root.querySelector("textarea");
    return input && !input.disabled;
  }, null, { timeout: 15_000 });
}

/** Types `text` and presses Enter. */
export async function sendMessage(page, text) {
  await page.fill(`${W} textarea`, text);
  await page.press(`${W} textarea`, "Enter");
}

/** The text of the last assistant bubble ("" when none). */
export async function lastAnswer(page) {
  return page.evaluate(() => {
    const all = document.querySelector("spillway-chat").shadowRoot.querySelectorAll(".msg.assistant");
    return all.length ? all[all.length - 1].textContent : "";
  });
}

/** Waits for the last answer to be exactly `expected` and no longer streaming. */
export async function waitForAnswer(page, expected, timeout = 20_000) {
  try {
    await page.waitForFunction((want) => {
      const all = document.querySelector("spillway-chat").shadowRoot.querySelectorAll(".msg.assistant");
      const last = all[all.length - 1];
      return last && last.getAttribute("aria-busy") === "false" && last.textContent === want;
    }, expected, { timeout });
  } catch (err) {
    throw new Error(`the answer never became the expected text.\n  expected: ${JSON.stringify(expected)}\n  got:      ${JSON.stringify(await lastAnswer(page))}`);
  }
}

/** Waits until the last answer has some text but not all of `expected`. */
export async function waitForPartial(page, expected, timeout = 15_000) {
  await page.waitForFunction((want) => {
    const all = document.querySelector("spillway-chat").shadowRoot.querySelectorAll(".msg.assistant");
    const t = all.length ? all[all.length - 1].textContent : "";
    return t.length > 0 && t.length < want.length;
  }, expected, { timeout });
  return lastAnswer(page);
}

/** Records every distinct text the last assistant bubble shows, in the page. */
export async function recordAnswerStates(page) {
  await page.evaluate(() => {
    const root = document.querySelector("spillway-chat").shadowRoot;
    window.__answerStates = [];
    const seen = () => {
      const all = root.querySelectorAll(".msg.assistant");
      const t = all.length ? all[all.length - 1].textContent : "";
      const states = window.__answerStates;
      if (t && states[states.length - 1] !== t) states.push(t);
    };
    new MutationObserver(seen).observe(root, { subtree: true, childList: true, characterData: true });
  });
}

export async function answerStates(page) {
  return page.evaluate(() => window.__answerStates || []);
}

/** Makes every WebSocket the page opens reachable as window.__sockets (an init script). */
export function trackSockets() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      window.__sockets.push(this);
    }
  };
}
