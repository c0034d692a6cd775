// Opens a flow run's page in the Prefect UI in headless Chromium, checks that every given
// task run is listed (and, with EXPECT_CACHED=1, that one shows Cached), and saves a
// screenshot. With ARTIFACT_KEY and ARTIFACTS_SCREENSHOT, it then opens the run's Artifacts
// tab, checks that the artifact with that key is shown, and saves a screenshot of it.
//
//   node prefect-ui.mjs <flow run page URL> <screenshot.png> <task run name>...
//
// Chromium is Debian's (`CHROMIUM`, default /usr/bin/chromium), started with a fresh profile
// and no background traffic: the page and the API are on 127.0.0.1 and nothing else is
// reached.

import { chromium } from 'playwright-core';

const [url, screenshot, ...taskRuns] = process.argv.slice(2);
if (!url || !screenshot || taskRuns.length === 0) {
  console.error('usage: node prefect-ui.mjs <flow run URL> <screenshot.png> <task run name>...');
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  const outside = [];
  page.on('request', (request) => {
    const address = new URL(request.url());
    const network = ['http:', 'https:', 'ws:', 'wss:'].includes(address.protocol);
    if (network && !['127.0.0.1', 'localhost', '[::1]'].includes(address.hostname)) {
      outside.push(request.url());
    }
  });
  await page.goto(url, { waitUntil: 'networkidle', timeout: 60_000 });
  // The task runs are listed under the "Task Runs" tab of the flow run page.
  await page.getByText('Task Runs', { exact: true }).first().click({ timeout: 30_000 });
  for (const name of taskRuns) {
    await page.getByText(name, { exact: true }).first().waitFor({ state: 'visible', timeout: 30_000 });
  }
  if (process.env.EXPECT_CACHED === '1') {
    await page.getByText('Cached', { exact: true }).first().waitFor({ state: 'visible', timeout: 30_000 });
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  const artifactKey = process.env.ARTIFACT_KEY;
  const artifactsScreenshot = process.env.ARTIFACTS_SCREENSHOT;
  if (artifactKey && artifactsScreenshot) {
    await page.getByText('Artifacts', { exact: true }).first().click({ timeout: 30_000 });
    await page.getByText(artifactKey, { exact: true }).first().waitFor({ state: 'visible', timeout: 30_000 });
    await page.screenshot({ path: artifactsScreenshot, fullPage: true });
    console.log(`artifact ${artifactKey} shown; screenshot saved to ${artifactsScreenshot}`);
  }
  if (outside.length > 0) {
    throw new Error(`the page asked for addresses off this machine: ${outside.join(', ')}`);
  }
  console.log(`listed ${taskRuns.length} task run(s); screenshot saved to ${screenshot}`);
} finally {
  await browser.close();
}
