// Runs one browser scenario: `node run.mjs <name>` loads
// scenarios/<name>.mjs and runs its default export through the harness.
// Exit code 0: it passed; 1: it failed (or could not be found).
//
// tests/browser.rs runs this with SCENARIO_ENV set. By hand, against a
// gateway you started yourself:
//
//   SPILLWAY_URL=http://127.0.0.1:8080 node run.mjs demo_page_loads

import { readdir } from "node:fs/promises";
import { pathToFileURL, fileURLToPath } from "node:url";
import path from "node:path";
import { run } from "./harness.mjs";

const scenarios = path.join(path.dirname(fileURLToPath(import.meta.url)), "scenarios");
const name = process.argv[2];

async function known() {
  const files = await readdir(scenarios).catch(() => []);
  return files.filter((f) => f.endsWith(".mjs")).map((f) => f.slice(0, -4)).sort();
}

if (!name || !/^[a-z0-9][a-z0-9_-]*$/.test(name) || !(await known()).includes(name)) {
  console.error(`usage: node run.mjs <scenario>\nscenarios: ${(await known()).join(", ") || "(none)"}`);
  process.exit(1);
}

const module = await import(pathToFileURL(path.join(scenarios, `${name}.mjs`)).href);
if (typeof module.default !== "function") {
  console.error(`scenarios/${name}.mjs must export a default async function (ctx)`);
  process.exit(1);
}
process.exit(await run(name, module.default));
