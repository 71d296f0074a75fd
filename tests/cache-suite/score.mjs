// Scores one run of the cache test suite (the JSON its cli prints) the way cache-tests.fyi
// does (the suite's own determineTestResult, dependencies honoured), per test group, and
// checks it against the recorded baseline. Also checks Kalmar's JSON access log: every
// request of the suite must have gone through the proxy.
//
//   node score.mjs --suite DIR --results FILE [--access-log FILE --origin URL]
//                  [--baseline FILE [--record]] [--json]
//
// Exit 1 when a required test outside `cdn-cache-control` fails, a test failed in setup
// (or the harness), the passes fall below the baseline, or the access log misses requests.
import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const args = {}
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i]
  if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`)
  const next = process.argv[i + 1]
  if (next === undefined || next.startsWith('--')) args[a.slice(2)] = true
  else { args[a.slice(2)] = next; i++ }
}
if (!args.suite || !args.results) {
  console.error('usage: node score.mjs --suite DIR --results FILE [--access-log FILE --origin URL] [--baseline FILE [--record]]')
  process.exit(2)
}

const suiteUrl = f => pathToFileURL(path.join(path.resolve(args.suite), f)).href
const suites = (await import(suiteUrl('tests/index.mjs'))).default
const { determineTestResult, resultTypes } = await import(suiteUrl('test-engine/lib/results.mjs'))
const results = JSON.parse(fs.readFileSync(args.results, 'utf8'))

// The group a forward proxy is not asked to follow (CDN-Cache-Control), scored apart.
const SEPARATE = 'cdn-cache-control'
// Checks whose premise RFC 9111 rules out, so they fail in setup for a conforming cache
// (and for every cache on cache-tests.fyi): counted, listed, not a failure of the run.
const PREMISE_NOT_RFC = {
  'head-410-update': 'assumes a 410 answer to HEAD refreshes the stored 200 GET; RFC 9111 4.3.5 updates only from a 200'
}
const kindOf = new Map(Object.entries(resultTypes).map(([name, t]) => [t, name]))
const empty = () => ({ pass: 0, fail: 0, optional_fail: 0, yes: 0, no: 0, setup_fail: 0, harness_fail: 0, dependency_fail: 0, retry: 0, untested: 0, premise_not_rfc: 0 })

const groups = {}
const failures = []
for (const suite of suites) {
  const counts = (groups[suite.id] = empty())
  for (const test of suite.tests) {
    const kind = kindOf.get(determineTestResult(suites, test.id, results))
    counts[kind]++
    if (kind === 'setup_fail' && test.id in PREMISE_NOT_RFC) {
      counts.setup_fail--
      counts.premise_not_rfc++
      failures.push({ group: suite.id, id: test.id, kind: 'premise', detail: PREMISE_NOT_RFC[test.id] })
    } else if (['fail', 'setup_fail', 'harness_fail', 'retry'].includes(kind)) {
      const detail = Array.isArray(results[test.id]) ? results[test.id][1] : ''
      failures.push({ group: suite.id, id: test.id, kind, detail })
    }
  }
}

const sum = pred => {
  const total = empty()
  for (const [id, counts] of Object.entries(groups)) {
    if (!pred(id)) continue
    for (const k of Object.keys(total)) total[k] += counts[k]
  }
  return total
}
const main = sum(id => id !== SEPARATE)
const cdn = sum(id => id === SEPARATE)
// "Passes" as cache-tests.fyi counts them: required and optimal tests passed. Checks
// (informational `check` tests, yes/no) are counted apart.
const passes = c => c.pass
const summary = {
  passes: passes(main),
  required_failures: main.fail,
  setup_failures: main.setup_fail + main.harness_fail + main.retry,
  checks_yes: main.yes,
  cdn_cache_control: { passes: passes(cdn), failures: cdn.fail + cdn.optional_fail + cdn.no },
  groups
}

const problems = []
const baseline = args.baseline && !args.record ? JSON.parse(fs.readFileSync(args.baseline, 'utf8')) : null
if (summary.required_failures > 0) problems.push(`${summary.required_failures} required test(s) failed outside ${SEPARATE}`)
if (summary.setup_failures > 0) problems.push(`${summary.setup_failures} test(s) failed in setup or the harness`)

if (args['access-log']) {
  // Every test makes one PUT /config, its requests, and (once they all answered) one
  // GET /state: all of them must be in Kalmar's log, in absolute form (no CONNECT).
  const origin = args.origin
  const lines = fs.readFileSync(args['access-log'], 'utf8').split('\n').filter(Boolean).map(l => JSON.parse(l))
  const ours = lines.filter(l => typeof l.target === 'string' && l.target.startsWith(`${origin}/`))
  const count = (method, prefix) => ours.filter(l => l.method === method && l.target.startsWith(`${origin}/${prefix}/`)).length
  const tunnels = lines.filter(l => l.method === 'CONNECT').length
  const testsRun = Object.keys(results).length
  let passedRequests = 0
  for (const suite of suites) {
    for (const test of suite.tests) if (results[test.id] === true) passedRequests += test.requests.length
  }
  const seen = {
    config_puts: count('PUT', 'config'),
    state_gets: count('GET', 'state'),
    test_requests: ours.filter(l => l.target.startsWith(`${origin}/test/`)).length,
    tunnels
  }
  summary.access_log = seen
  if (seen.config_puts !== testsRun) problems.push(`access log: ${seen.config_puts} PUT /config through Kalmar, ${testsRun} tests ran`)
  if (seen.state_gets < main.pass + cdn.pass) problems.push(`access log: only ${seen.state_gets} GET /state through Kalmar`)
  if (seen.test_requests < passedRequests) problems.push(`access log: ${seen.test_requests} test requests through Kalmar, the passed tests alone made ${passedRequests}`)
  if (tunnels > 0) problems.push(`access log: ${tunnels} CONNECT tunnels (requests must be in absolute form)`)
}

if (args.baseline && args.record) {
  const { passes, required_failures, setup_failures, checks_yes, cdn_cache_control } = summary
  fs.writeFileSync(args.baseline, JSON.stringify({ passes, required_failures, setup_failures, checks_yes, cdn_cache_control, groups }, null, 2) + '\n')
} else if (baseline) {
  if (summary.passes < baseline.passes) problems.push(`${summary.passes} passes, below the recorded ${baseline.passes}`)
  summary.recorded_passes = baseline.passes
}

if (args.json) {
  console.log(JSON.stringify({ ...summary, failures, problems }, null, 2))
} else {
  const pad = (s, n) => String(s).padEnd(n)
  console.log(`${pad('group', 22)} pass  fail  opt-fail  yes  no  setup  dep-fail`)
  for (const [id, c] of Object.entries(groups)) {
    console.log(`${pad(id, 22)} ${pad(c.pass, 5)} ${pad(c.fail, 5)} ${pad(c.optional_fail, 9)} ${pad(c.yes, 4)} ${pad(c.no, 3)} ${pad(c.setup_fail + c.harness_fail + c.retry, 6)} ${c.dependency_fail}`)
  }
  console.log(`\npasses outside ${SEPARATE}: ${summary.passes}${summary.recorded_passes !== undefined ? ` (recorded: ${summary.recorded_passes})` : ''}; required failures: ${summary.required_failures}; setup failures: ${summary.setup_failures}`)
  console.log(`${SEPARATE}: ${summary.cdn_cache_control.passes} passes, ${summary.cdn_cache_control.failures} not followed`)
  if (summary.access_log) console.log(`through Kalmar: ${JSON.stringify(summary.access_log)}`)
  for (const f of failures) console.log(`  ${f.kind.padEnd(12)} ${f.group}/${f.id}: ${f.detail}`)
  for (const p of problems) console.log(`PROBLEM: ${p}`)
}
process.exit(problems.length ? 1 : 0)
