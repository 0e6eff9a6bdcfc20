package main

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
)

func write(t *testing.T, path, text string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
}

func contains(problems []string, part string) bool {
	for _, p := range problems {
		if strings.Contains(p, part) {
			return true
		}
	}
	return false
}

// The repository's own dashboards, rules, tests and docs pass.
func TestRepositoryPassesStatic(t *testing.T) {
	root := filepath.Join("..", "..", "..")
	dashboards, alerts, err := load(root)
	if err != nil {
		t.Fatal(err)
	}
	pending, err := loadPending(root)
	if err != nil {
		t.Fatal(err)
	}
	if problems := static(root, dashboards, alerts, pending); len(problems) > 0 {
		t.Fatalf("problems:\n%s", strings.Join(problems, "\n"))
	}
	if len(dashboards) != 5 || len(alerts) < 9 {
		t.Fatalf("%d dashboards, %d alerts", len(dashboards), len(alerts))
	}
}

const badDashboard = `{
  "uid": "x", "title": "X",
  "templating": {"list": [
    {"name": "region", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "query": {"query": "label_values(up, region)"}}
  ]},
  "panels": [
    {"id": 1, "type": "timeseries", "title": "hard-coded",
     "datasource": {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"},
     "targets": [{"refId": "A", "expr": "sum(rate(a_total{region=~\"$region\"}[$__rate_interval]))"}]},
    {"id": 1, "type": "timeseries", "title": "undefined and broken",
     "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "targets": [{"refId": "A", "expr": "sum(b{pod=\"$pod\"}"}]}
  ]
}`

const badRules = `groups:
  - name: g
    rules:
      - alert: NoRunbook
        expr: up == 0
        labels: {severity: warning}
        annotations: {summary: s, description: d}
      - alert: WrongAnchor
        expr: up == 0
        annotations: {summary: s, description: d, runbook_url: "docs/observability.md#nowhere"}
`

const badTests = `rule_files: [x.rules.yaml]
tests:
  - input_series: []
    alert_rule_test:
      - eval_time: 1m
        alertname: NoRunbook
        exp_alerts: []
      - eval_time: 1m
        alertname: Unknown
        exp_alerts: []
`

// Every kind of problem the static check looks for is reported.
func TestStaticFindsProblems(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "dashboards", "bad.json"), badDashboard)
	write(t, filepath.Join(root, "dashboards", "rules", "x.rules.yaml"), badRules)
	write(t, filepath.Join(root, "dashboards", "rules", "x.test.yaml"), badTests)
	write(t, filepath.Join(root, "docs", "observability.md"), "# Doc\n\n### WrongAnchorX\n")
	dashboards, alerts, err := load(root)
	if err != nil {
		t.Fatal(err)
	}
	problems := static(root, dashboards, alerts, map[string]bool{})
	for _, want := range []string{
		"no `datasource` template variable",
		`datasource uid "P1809F7CD0C75ACF3" is hard-coded`,
		"panel id 1 used twice",
		"uses undefined $pod",
		`"undefined and broken" / A:`, // the parse error
		"alert NoRunbook: no runbook_url annotation",
		"alert WrongAnchor: no severity label",
		`runbook_url "docs/observability.md#nowhere" is not a section`,
		"tests unknown alert Unknown",
		"alert NoRunbook: no promtool test case where it fires",
		"alert WrongAnchor: no promtool test case where it does not fire",
	} {
		if !contains(problems, want) {
			t.Errorf("no problem containing %q in:\n%s", want, strings.Join(problems, "\n"))
		}
	}
}

func TestVariablesAndLabelValues(t *testing.T) {
	got := substitute(`x{a=~"$ns", b="${pod}", c="[[region]]"}[$__rate_interval]`,
		map[string]string{"ns": "default", "pod": "p-1", "region": "eu"})
	if want := `x{a=~"default", b="p-1", c="eu"}[1m]`; got != want {
		t.Fatalf("got %s want %s", got, want)
	}
	if names := referenced(`$a ${b} [[c]] $__interval`); strings.Join(names, ",") != "a,b,c,__interval" {
		t.Fatalf("referenced: %v", names)
	}
	sel, label, ok := labelValuesQuery(`label_values(up{job="x", region=~"$r"}, pod)`)
	if !ok || sel != `up{job="x", region=~"$r"}` || label != "pod" {
		t.Fatalf("%q %q %v", sel, label, ok)
	}
	if sel, label, ok := labelValuesQuery("label_values(namespace)"); !ok || sel != "" || label != "namespace" {
		t.Fatalf("%q %q %v", sel, label, ok)
	}
	// Selectors inside ranges, subqueries, binary operations and aggregations are all found.
	expr, err := promqlParser.ParseExpr(`histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[5m]))) / on() group_left max_over_time(b[5m:]) and c offset 1m`)
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, ms := range parser.ExtractSelectors(expr) {
		found = append(found, matchString(ms))
	}
	want := `{__name__="a_bucket", x="1"} {__name__="b"} {__name__="c"}`
	if strings.Join(found, " ") != want {
		t.Fatalf("selectors %v, want %s", found, want)
	}
}

// A fake Prometheus: series exist for metric `present` only; the query API fails for one
// expression. live must report the missing selectors with where they are used, the failing
// expression, and resolve the variable from label values.
func TestLiveReportsMissingSelectorsAndFailingExpressions(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "dashboards", "d.json"), `{
  "uid": "d", "title": "D",
  "templating": {"list": [
    {"name": "datasource", "type": "datasource", "query": "prometheus"},
    {"name": "region", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "query": {"query": "label_values(present, region)"}}
  ]},
  "panels": [
    {"id": 1, "type": "timeseries", "title": "ok", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "targets": [{"refId": "A", "expr": "sum(present{region=\"$region\"})"}]},
    {"id": 2, "type": "timeseries", "title": "missing", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "targets": [{"refId": "A", "expr": "present{region=\"$region\"} / absent_metric"}]}
  ]
}`)
	write(t, filepath.Join(root, "dashboards", "rules", "r.rules.yaml"), `groups:
  - name: g
    rules:
      - alert: Broken
        expr: present > 0 and also_missing
`)
	var queried []string
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok := func(data any) { _ = json.NewEncoder(w).Encode(map[string]any{"status": "success", "data": data}) }
		switch {
		case r.URL.Path == "/api/v1/label/region/values":
			ok([]string{"us", "eu"})
		case r.URL.Path == "/api/v1/series":
			m := r.URL.Query().Get("match[]")
			if strings.Contains(m, `__name__="present"`) && strings.Contains(m, `region="eu"`) || m == `{__name__="present"}` {
				ok([]map[string]string{{"__name__": "present", "region": "eu"}})
			} else {
				ok([]map[string]string{})
			}
		case r.URL.Path == "/api/v1/query":
			q := r.URL.Query().Get("query")
			queried = append(queried, q)
			if strings.Contains(q, "also_missing") {
				w.WriteHeader(http.StatusBadRequest)
				_ = json.NewEncoder(w).Encode(map[string]any{"status": "error", "errorType": "bad_data", "error": "boom"})
				return
			}
			ok(map[string]any{"resultType": "vector", "result": []any{}})
		default:
			http.NotFound(w, r)
		}
	}))
	defer fake.Close()
	dashboards, alerts, err := load(root)
	if err != nil {
		t.Fatal(err)
	}
	report := filepath.Join(root, "report.json")
	problems := live(fake.URL, dashboards, alerts, map[string]bool{}, report, false)
	for _, want := range []string{
		`no series for {__name__="absent_metric"} (used by d.json / "missing" / A)`,
		`no series for {__name__="also_missing"} (used by r.rules.yaml / alert Broken)`,
		"r.rules.yaml / alert Broken: expression failed: bad_data: boom",
	} {
		if !contains(problems, want) {
			t.Errorf("no problem containing %q in:\n%s", want, strings.Join(problems, "\n"))
		}
	}
	if len(problems) != 3 {
		t.Errorf("want 3 problems, got:\n%s", strings.Join(problems, "\n"))
	}
	if !contains(queried, `sum(present{region="eu"})`) {
		t.Errorf("the variable was not resolved to the first sorted value: %v", queried)
	}
	var r Report
	b, _ := os.ReadFile(report)
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	// Selectors: the variable's (present), ok (present{eu}), missing (present{eu}, absent_metric),
	// rule (present, also_missing): 6, of which 4 distinct.
	if r.Selectors != 6 || r.DistinctSelector != 4 || r.Expressions != 3 || len(r.Missing) != 2 {
		t.Errorf("report %+v", r)
	}
}

const pendingDashboard = `{
  "uid": "p", "title": "P",
  "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
  "panels": [
    {"id": 1, "type": "timeseries", "title": "future", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "targets": [{"refId": "A", "expr": "sum(rate(future_total[5m])) + sum(present)"}]},
    {"id": 2, "type": "timeseries", "title": "arrived", "datasource": {"type": "prometheus", "uid": "${datasource}"},
     "targets": [{"refId": "A", "expr": "sum(arrived)"}]}
  ]
}`

// Metrics in dashboards/pending-metrics.txt: skipped while they have no series, a problem
// once they have some, never skipped for a rule; static rejects unused names, names used by
// rules and lines that are not metric names.
func TestPendingMetrics(t *testing.T) {
	root := t.TempDir()
	write(t, filepath.Join(root, "dashboards", "p.json"), pendingDashboard)
	write(t, filepath.Join(root, "dashboards", "rules", "r.rules.yaml"), `groups:
  - name: g
    rules:
      - alert: UsesFuture
        expr: future_total > 0
`)
	write(t, filepath.Join(root, "dashboards", "pending-metrics.txt"),
		"# not yet exported\nfuture_total  # the gateway\narrived\n\nunused_metric\n")
	write(t, filepath.Join(root, "docs", "observability.md"), "# Doc\n")
	dashboards, alerts, err := load(root)
	if err != nil {
		t.Fatal(err)
	}
	pending, err := loadPending(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(pending) != 3 || !pending["future_total"] || !pending["arrived"] || !pending["unused_metric"] {
		t.Fatalf("pending %v", pending)
	}
	problems := static(root, dashboards, alerts, pending)
	for _, want := range []string{
		"no dashboard queries unused_metric",
		"alert UsesFuture uses future_total",
	} {
		if !contains(problems, want) {
			t.Errorf("static: no problem containing %q in:\n%s", want, strings.Join(problems, "\n"))
		}
	}
	if contains(problems, "no dashboard queries future_total") || contains(problems, "no dashboard queries arrived") {
		t.Errorf("static: queried names reported unused:\n%s", strings.Join(problems, "\n"))
	}

	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok := func(data any) { _ = json.NewEncoder(w).Encode(map[string]any{"status": "success", "data": data}) }
		switch r.URL.Path {
		case "/api/v1/series":
			m := r.URL.Query().Get("match[]")
			if m == `{__name__="present"}` || m == `{__name__="arrived"}` {
				ok([]map[string]string{{"__name__": "x"}})
			} else {
				ok([]map[string]string{})
			}
		case "/api/v1/query":
			ok(map[string]any{"resultType": "vector", "result": []any{}})
		default:
			http.NotFound(w, r)
		}
	}))
	defer fake.Close()
	report := filepath.Join(root, "report.json")
	problems = live(fake.URL, dashboards, alerts, pending, report, false)
	for _, want := range []string{
		"arrived has series now",
		`no series for {__name__="future_total"} (used by p.json / "future" / A; r.rules.yaml / alert UsesFuture)`,
	} {
		if !contains(problems, want) {
			t.Errorf("live: no problem containing %q in:\n%s", want, strings.Join(problems, "\n"))
		}
	}
	if len(problems) != 2 {
		t.Errorf("live: want 2 problems, got:\n%s", strings.Join(problems, "\n"))
	}

	// Without the rule, the dashboard's use of future_total is skipped, not missing.
	problems = live(fake.URL, dashboards, nil, map[string]bool{"future_total": true}, report, false)
	if len(problems) != 0 {
		t.Errorf("live without the rule: %s", strings.Join(problems, "\n"))
	}
	var r Report
	b, _ := os.ReadFile(report)
	if err := json.Unmarshal(b, &r); err != nil {
		t.Fatal(err)
	}
	if len(r.Pending) != 1 || len(r.Missing) != 0 {
		t.Errorf("report %+v", r)
	}

	write(t, filepath.Join(root, "dashboards", "pending-metrics.txt"), "not a name\n")
	if _, err := loadPending(root); err == nil || !strings.Contains(err.Error(), "pending-metrics.txt:1") {
		t.Errorf("a bad line gave %v", err)
	}
}
