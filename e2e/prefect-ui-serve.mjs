// Runs a served Rust deployment from the Prefect UI in headless Chromium, as a user would:
// a custom run with the parameters form, a quick run, and a long run cancelled from its
// page. Checks each run's final state through the REST API, and saves a screenshot of the
// deployment page with the three runs.
//
//   node prefect-ui-serve.mjs <UI URL> <API URL> <deployment id> <screenshot.png>
//
// Prints one JSON line: {"cancelled": <flow run id>, "cancel_seconds": <from Confirm to Cancelled>}.

import { chromium } from 'playwright-core';

const [ui, api, deployment, screenshot] = process.argv.slice(2);
if (!ui || !api || !deployment || !screenshot) {
  console.error('usage: node prefect-ui-serve.mjs <UI URL> <API URL> <deployment id> <screenshot.png>');
  process.exit(2);
}

async function call(path, body) {
  const init = body === undefined ? {} : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
  const response = await fetch(api + path, init);
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Polls until `find` returns something, or fails after `seconds`.
async function until(what, seconds, find) {
  const deadline = Date.now() + seconds * 1000;
  for (;;) {
    const found = await find();
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds} s waiting for ${what}`);
    await sleep(250);
  }
}

const runsOfDeployment = () => call('/flow_runs/filter', { deployments: { id: { any_: [deployment] } } });
const runNamed = (name) => until(`a flow run named ${name}`, 30, async () => (await call('/flow_runs/filter', { flow_runs: { name: { any_: [name] } } }))[0]);
const inState = (run, types, seconds) => until(`flow run ${run.name} in ${types}`, seconds, async () => {
  const read = await call(`/flow_runs/${run.id}`);
  return types.includes(read.state_type) ? read : undefined;
});

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  const outside = [];
  page.on('request', (request) => {
    const address = new URL(request.url());
    const network = ['http:', 'https:', 'ws:', 'wss:'].includes(address.protocol);
    if (network && !['127.0.0.1', 'localhost', '[::1]'].includes(address.hostname)) outside.push(request.url());
  });
  const deploymentPage = `${ui}/deployments/deployment/${deployment}`;

  // A custom run: the form drawn from the flow's parameter schema. A busy machine can lose
  // a submission: the form is filled again once.
  async function customRun(name, highestNumber) {
    for (let attempt = 1; ; attempt += 1) {
      await page.goto(deploymentPage, { waitUntil: 'networkidle', timeout: 60_000 });
      await page.getByRole('button', { name: 'Run', exact: true }).click();
      await page.getByText('Custom run', { exact: true }).click();
      await page.getByText('highest_number', { exact: true }).waitFor({ timeout: 30_000 });
      await page.waitForLoadState('networkidle', { timeout: 30_000 });
      // The form fills itself in (a generated run name, the default parameters) after it
      // shows: filled before that, its values are overwritten, and the run gets another name.
      const nameField = page.locator('input[type=text]').first();
      const numberField = page.locator('input[type=number]').first();
      await until('the form to fill itself in', 30, async () => (await nameField.inputValue()) !== '' && (await numberField.inputValue()) !== '');
      await nameField.fill(name);
      await numberField.fill(String(highestNumber));
      const kept = (await nameField.inputValue()) === name && (await numberField.inputValue()) === String(highestNumber);
      if (kept) {
        await page.getByRole('button', { name: 'Submit', exact: true }).click();
        try {
          return await runNamed(name);
        } catch (error) {
          if (attempt >= 3) {
            const runs = (await runsOfDeployment()).map((run) => `${run.name} ${JSON.stringify(run.parameters)}`);
            throw new Error(`${error.message}; the deployment's runs: ${runs.join(', ')}`);
          }
        }
      } else if (attempt >= 3) {
        throw new Error(`the custom run form did not keep ${name} and ${highestNumber}`);
      }
    }
  }

  const custom = await customRun('custom-run-from-the-ui', 3);
  const customDone = await inState(custom, ['COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED'], 180);
  if (customDone.state_type !== 'COMPLETED' || customDone.parameters.highest_number !== 3) {
    throw new Error(`the custom run ended ${customDone.state_type} with ${JSON.stringify(customDone.parameters)}`);
  }

  // A quick run, with the deployment's default parameters.
  const known = new Set((await runsOfDeployment()).map((run) => run.id));
  await page.goto(deploymentPage, { waitUntil: 'networkidle', timeout: 60_000 });
  await page.getByRole('button', { name: 'Run', exact: true }).click();
  await page.getByText('Quick run', { exact: true }).click();
  // This UI asks to confirm the parameters of a quick run in a dialog.
  const confirm = page.getByText('Run Deployment', { exact: true });
  if (await confirm.waitFor({ timeout: 5_000 }).then(() => true, () => false)) {
    await page.getByRole('button', { name: 'Run', exact: true }).last().click();
  }
  const quick = await until('the quick run', 30, async () => (await runsOfDeployment()).find((run) => !known.has(run.id)));
  const quickDone = await inState(quick, ['COMPLETED', 'FAILED', 'CRASHED', 'CANCELLED'], 180);
  if (quickDone.state_type !== 'COMPLETED' || quickDone.parameters.highest_number !== 10) {
    throw new Error(`the quick run ended ${quickDone.state_type} with ${JSON.stringify(quickDone.parameters)}`);
  }

  // A long run, cancelled from its page once it runs.
  const long = await customRun('long-run-cancelled-from-the-ui', 400);
  await inState(long, ['RUNNING'], 120);
  await page.goto(`${ui}/runs/flow-run/${long.id}`, { waitUntil: 'networkidle', timeout: 60_000 });
  await page.getByRole('button', { name: 'Cancel', exact: true }).first().click();
  await page.getByRole('button', { name: 'Confirm', exact: true }).click();
  const confirmed = Date.now();
  const cancelled = await inState(long, ['CANCELLED', 'COMPLETED', 'FAILED', 'CRASHED'], 60);
  const seconds = (Date.now() - confirmed) / 1000;
  if (cancelled.state_type !== 'CANCELLED') throw new Error(`the cancelled run ended ${cancelled.state_type}`);

  await page.goto(deploymentPage, { waitUntil: 'networkidle', timeout: 60_000 });
  await page.getByText('long-run-cancelled-from-the-ui').first().waitFor({ timeout: 30_000 });
  await page.getByText('custom-run-from-the-ui').first().waitFor({ timeout: 30_000 });
  await page.screenshot({ path: screenshot });
  if (outside.length > 0) throw new Error(`the page asked for addresses off this machine: ${outside.join(', ')}`);
  console.log(JSON.stringify({ cancelled: long.id, cancel_seconds: seconds }));
} finally {
  await browser.close();
}
