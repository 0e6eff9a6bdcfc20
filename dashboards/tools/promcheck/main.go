// Command promcheck checks Refleet's Grafana dashboards and Prometheus alert rules.
//
//	promcheck static -root DIR
//	promcheck live -root DIR -prometheus http://127.0.0.1:9090 [-json FILE] [-rules-loaded]
//
// static (no Prometheus needed): every dashboard under DIR/dashboards has a Prometheus
// datasource variable and uses it everywhere (no hard-coded datasource UID), unique uids,
// titles and panel ids, only defined template variables; every panel and rule expression
// parses with Prometheus's own PromQL parser once its variables are substituted; every alert
// has a severity, a summary, a description and a runbook_url whose anchor is a heading of
// DIR/docs/observability.md; and the promtool unit tests have a firing and a not-firing
// case for every alert.
//
// live: resolves the dashboards' template variables against the running Prometheus as
// Grafana would (label_values(...) → the first value), then for every vector selector in
// every panel, variable and rule expression asks /api/v1/series whether series exist, and
// evaluates every whole expression with /api/v1/query. With -rules-loaded it also checks
// that Prometheus loaded every alert rule and evaluates it without error. Exits 1 on
// anything missing or failing, listing each selector with where it is used.
//
// DIR/dashboards/pending-metrics.txt lists metrics the dashboards query before any component
// exports them. live skips a dashboard selector of such a metric while it has no series (and
// says so), and fails once it has series, so that the name comes off the list and the check
// covers it; static fails on a listed name no dashboard queries, or one an alert rule uses.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
	"gopkg.in/yaml.v3"
)

// Grafana's interval variables, substituted the way Grafana would for a 5 s scrape interval
// and a 1 h dashboard range.
var builtins = map[string]string{
	"__rate_interval": "1m",
	"__interval":      "30s",
	"__range":         "1h",
}

// Expr is one PromQL expression and where it comes from.
type Expr struct {
	Where string `json:"where"`
	Query string `json:"query"`
}

// Variable is a dashboard template variable.
type Variable struct {
	Name       string
	Type       string
	Query      string
	IncludeAll bool
	Options    []string
}

// Dashboard is what promcheck needs of one dashboard file.
type Dashboard struct {
	File   string
	Title  string
	UID    string
	Vars   []Variable
	Panels int
	Exprs  []Expr
	raw    map[string]any
}

// Alert is one alerting rule.
type Alert struct {
	Name        string            `yaml:"alert"`
	Record      string            `yaml:"record"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
	File        string            `yaml:"-"`
}

type ruleFile struct {
	Groups []struct {
		Name  string  `yaml:"name"`
		Rules []Alert `yaml:"rules"`
	} `yaml:"groups"`
}

type testFile struct {
	Tests []struct {
		AlertRuleTests []struct {
			EvalTime  string           `yaml:"eval_time"`
			Alertname string           `yaml:"alertname"`
			ExpAlerts []map[string]any `yaml:"exp_alerts"`
		} `yaml:"alert_rule_test"`
	} `yaml:"tests"`
}

var promqlParser = parser.NewParser(parser.Options{})

func main() {
	root := flag.String("root", ".", "repository root")
	promURL := flag.String("prometheus", "", "base URL of a running Prometheus (live)")
	jsonOut := flag.String("json", "", "write the live report as JSON to this file")
	rulesLoaded := flag.Bool("rules-loaded", false, "live: Prometheus loaded the rule files; check each alert's health")
	if len(os.Args) < 2 || (os.Args[1] != "static" && os.Args[1] != "live") {
		fmt.Fprintln(os.Stderr, "usage: promcheck static [-root DIR] | promcheck live [-root DIR] -prometheus URL [-json FILE] [-rules-loaded]")
		os.Exit(2)
	}
	mode := os.Args[1]
	var pending map[string]bool
	_ = flag.CommandLine.Parse(os.Args[2:])
	if flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "promcheck: unexpected arguments:", flag.Args())
		os.Exit(2)
	}
	dashboards, alerts, err := load(*root)
	if err == nil {
		pending, err = loadPending(*root)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "promcheck:", err)
		os.Exit(1)
	}
	var problems []string
	if mode == "static" {
		problems = static(*root, dashboards, alerts, pending)
	} else {
		if *promURL == "" {
			fmt.Fprintln(os.Stderr, "promcheck live needs -prometheus URL")
			os.Exit(2)
		}
		problems = live(strings.TrimRight(*promURL, "/"), dashboards, alerts, pending, *jsonOut, *rulesLoaded)
	}
	for _, p := range problems {
		fmt.Fprintln(os.Stderr, "promcheck:", p)
	}
	if len(problems) > 0 {
		fmt.Fprintf(os.Stderr, "promcheck %s: FAILED (%d problems)\n", mode, len(problems))
		os.Exit(1)
	}
}

// ---- loading -------------------------------------------------------------------------

func load(root string) ([]*Dashboard, []Alert, error) {
	files, err := filepath.Glob(filepath.Join(root, "dashboards", "*.json"))
	if err != nil {
		return nil, nil, err
	}
	if len(files) == 0 {
		return nil, nil, fmt.Errorf("no dashboards under %s", filepath.Join(root, "dashboards"))
	}
	sort.Strings(files)
	var dashboards []*Dashboard
	for _, f := range files {
		d, err := loadDashboard(f)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", f, err)
		}
		dashboards = append(dashboards, d)
	}
	ruleFiles, err := filepath.Glob(filepath.Join(root, "dashboards", "rules", "*.rules.yaml"))
	if err != nil {
		return nil, nil, err
	}
	if len(ruleFiles) == 0 {
		return nil, nil, errors.New("no rule files (dashboards/rules/*.rules.yaml)")
	}
	var alerts []Alert
	for _, f := range ruleFiles {
		var rf ruleFile
		if err := readYAML(f, &rf); err != nil {
			return nil, nil, err
		}
		for _, g := range rf.Groups {
			for _, r := range g.Rules {
				r.File = filepath.Base(f)
				alerts = append(alerts, r)
			}
		}
	}
	return dashboards, alerts, nil
}

func readYAML(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := yaml.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}

// loadPending reads dashboards/pending-metrics.txt: one metric name a line, # comments.
// A missing file is an empty list.
func loadPending(root string) (map[string]bool, error) {
	pending := map[string]bool{}
	b, err := os.ReadFile(filepath.Join(root, "dashboards", "pending-metrics.txt"))
	if errors.Is(err, os.ErrNotExist) {
		return pending, nil
	}
	if err != nil {
		return nil, err
	}
	for i, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(line, "#")
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		if !metricName.MatchString(line) {
			return nil, fmt.Errorf("dashboards/pending-metrics.txt:%d: %q is not a metric name", i+1, line)
		}
		pending[line] = true
	}
	return pending, nil
}

var metricName = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)

// selectorMetric is the metric name a selector's matchers fix, or "".
func selectorMetric(ms []*labels.Matcher) string {
	for _, m := range ms {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			return m.Value
		}
	}
	return ""
}

func loadDashboard(path string) (*Dashboard, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, err
	}
	d := &Dashboard{File: filepath.Base(path), raw: raw}
	d.Title, _ = raw["title"].(string)
	d.UID, _ = raw["uid"].(string)
	if t, ok := raw["templating"].(map[string]any); ok {
		list, _ := t["list"].([]any)
		for _, item := range list {
			v, _ := item.(map[string]any)
			if v == nil {
				continue
			}
			variable := Variable{}
			variable.Name, _ = v["name"].(string)
			variable.Type, _ = v["type"].(string)
			variable.IncludeAll, _ = v["includeAll"].(bool)
			switch q := v["query"].(type) {
			case string:
				variable.Query = q
			case map[string]any:
				variable.Query, _ = q["query"].(string)
			}
			if opts, ok := v["options"].([]any); ok {
				for _, o := range opts {
					if om, ok := o.(map[string]any); ok {
						if val, ok := om["value"].(string); ok {
							variable.Options = append(variable.Options, val)
						}
					}
				}
			}
			d.Vars = append(d.Vars, variable)
		}
	}
	var walk func(panels []any)
	walk = func(panels []any) {
		for _, p := range panels {
			panel, _ := p.(map[string]any)
			if panel == nil {
				continue
			}
			if nested, ok := panel["panels"].([]any); ok {
				walk(nested)
			}
			if t, _ := panel["type"].(string); t == "row" {
				continue
			}
			d.Panels++
			title, _ := panel["title"].(string)
			targets, _ := panel["targets"].([]any)
			for _, t := range targets {
				target, _ := t.(map[string]any)
				expr, _ := target["expr"].(string)
				ref, _ := target["refId"].(string)
				d.Exprs = append(d.Exprs, Expr{
					Where: fmt.Sprintf("%s / %q / %s", d.File, title, ref),
					Query: expr,
				})
			}
		}
	}
	panels, _ := raw["panels"].([]any)
	walk(panels)
	return d, nil
}

// ---- variables -------------------------------------------------------------------------

var varRef = regexp.MustCompile(`\$\{([A-Za-z0-9_]+)(?::[A-Za-z]+)?\}|\$([A-Za-z0-9_]+)|\[\[([A-Za-z0-9_]+)\]\]`)

// referenced returns the variable names a text refers to.
func referenced(text string) []string {
	var names []string
	for _, m := range varRef.FindAllStringSubmatch(text, -1) {
		for _, g := range m[1:] {
			if g != "" {
				names = append(names, g)
			}
		}
	}
	return names
}

// substitute replaces every variable reference by its value; unknown names are left as they are.
func substitute(text string, values map[string]string) string {
	return varRef.ReplaceAllStringFunc(text, func(ref string) string {
		m := varRef.FindStringSubmatch(ref)
		for _, g := range m[1:] {
			if g == "" {
				continue
			}
			if v, ok := values[g]; ok {
				return v
			}
			if v, ok := builtins[g]; ok {
				return v
			}
		}
		return ref
	})
}

var labelValuesRe = regexp.MustCompile(`^\s*label_values\(\s*(?:(.*),\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$`)

// labelValuesQuery splits `label_values(selector, label)` / `label_values(label)`.
func labelValuesQuery(q string) (selector, label string, ok bool) {
	m := labelValuesRe.FindStringSubmatch(q)
	if m == nil {
		return "", "", false
	}
	return strings.TrimSpace(m[1]), m[2], true
}

// ---- static ---------------------------------------------------------------------------

func static(root string, dashboards []*Dashboard, alerts []Alert, pending map[string]bool) []string {
	var problems []string
	add := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }
	uids, titles := map[string]string{}, map[string]string{}
	panels, exprs, selectors := 0, 0, 0
	queried := map[string]bool{} // metric names of the dashboards' selectors
	for _, d := range dashboards {
		if d.UID == "" || d.Title == "" {
			add("%s: needs a uid and a title", d.File)
		}
		if other, dup := uids[d.UID]; dup {
			add("%s: uid %q also used by %s", d.File, d.UID, other)
		}
		if other, dup := titles[d.Title]; dup {
			add("%s: title %q also used by %s", d.File, d.Title, other)
		}
		uids[d.UID], titles[d.Title] = d.File, d.File
		if _, ok := d.raw["__inputs"]; ok {
			add("%s: has __inputs (an export for sharing): use the datasource variable instead", d.File)
		}
		defined := map[string]bool{}
		hasDS := false
		for _, v := range d.Vars {
			defined[v.Name] = true
			if v.Type == "datasource" && v.Name == "datasource" && v.Query == "prometheus" {
				hasDS = true
			}
		}
		if !hasDS {
			add("%s: no `datasource` template variable of type datasource (query prometheus)", d.File)
		}
		checkDatasources(d.File, d.raw, "", &problems)
		checkPanelIDs(d, &problems)
		placeholders := map[string]string{}
		for _, v := range d.Vars {
			placeholders[v.Name] = "placeholder"
			if v.Type != "query" {
				continue
			}
			sel, _, ok := labelValuesQuery(v.Query)
			if !ok {
				add("%s: variable %s: query %q is not label_values(...)", d.File, v.Name, v.Query)
				continue
			}
			for _, name := range referenced(v.Query) {
				if !defined[name] {
					add("%s: variable %s uses undefined $%s", d.File, v.Name, name)
				}
			}
			if sel != "" {
				if _, err := promqlParser.ParseExpr(substitute(sel, placeholders)); err != nil {
					add("%s: variable %s: %v", d.File, v.Name, err)
				}
			}
		}
		panels += d.Panels
		for _, e := range d.Exprs {
			exprs++
			if strings.TrimSpace(e.Query) == "" {
				add("%s: empty expression", e.Where)
				continue
			}
			for _, name := range referenced(e.Query) {
				if _, ok := builtins[name]; !defined[name] && !ok {
					add("%s: uses undefined $%s", e.Where, name)
				}
			}
			expr, err := promqlParser.ParseExpr(substitute(e.Query, placeholders))
			if err != nil {
				add("%s: %v", e.Where, err)
				continue
			}
			for _, ms := range parser.ExtractSelectors(expr) {
				selectors++
				queried[selectorMetric(ms)] = true
			}
		}
	}
	for _, name := range sortedKeys(pending) {
		if !queried[name] {
			add("dashboards/pending-metrics.txt: no dashboard queries %s: take it off the list", name)
		}
	}

	docs, err := os.ReadFile(filepath.Join(root, "docs", "observability.md"))
	if err != nil {
		add("reading docs/observability.md: %v", err)
	}
	anchors := headingAnchors(string(docs))
	names := map[string]bool{}
	for _, a := range alerts {
		if a.Record != "" {
			continue
		}
		if a.Name == "" {
			add("%s: a rule with neither alert nor record", a.File)
			continue
		}
		if names[a.Name] {
			add("%s: alert %s defined twice", a.File, a.Name)
		}
		names[a.Name] = true
		exprs++
		expr, err := promqlParser.ParseExpr(a.Expr)
		if err != nil {
			add("%s: alert %s: %v", a.File, a.Name, err)
		} else {
			for _, ms := range parser.ExtractSelectors(expr) {
				selectors++
				if name := selectorMetric(ms); pending[name] {
					add("%s: alert %s uses %s, which is in dashboards/pending-metrics.txt: rules must be checked live", a.File, a.Name, name)
				}
			}
		}
		if a.Labels["severity"] == "" {
			add("alert %s: no severity label", a.Name)
		}
		for _, k := range []string{"summary", "description", "runbook_url"} {
			if strings.TrimSpace(a.Annotations[k]) == "" {
				add("alert %s: no %s annotation", a.Name, k)
			}
		}
		if u := a.Annotations["runbook_url"]; u != "" {
			doc, anchor, _ := strings.Cut(u, "#")
			if !strings.HasSuffix(doc, "docs/observability.md") || !anchors[anchor] {
				add("alert %s: runbook_url %q is not a section of docs/observability.md", a.Name, u)
			}
		}
	}

	firing, quiet := map[string]int{}, map[string]int{}
	testFiles, _ := filepath.Glob(filepath.Join(root, "dashboards", "rules", "*.test.yaml"))
	if len(testFiles) == 0 {
		add("no promtool tests (dashboards/rules/*.test.yaml)")
	}
	for _, f := range testFiles {
		var tf testFile
		if err := readYAML(f, &tf); err != nil {
			add("%v", err)
			continue
		}
		for _, t := range tf.Tests {
			for _, c := range t.AlertRuleTests {
				if !names[c.Alertname] {
					add("%s: tests unknown alert %s", filepath.Base(f), c.Alertname)
				}
				if len(c.ExpAlerts) > 0 {
					firing[c.Alertname]++
				} else {
					quiet[c.Alertname]++
				}
			}
		}
	}
	var alertNames []string
	for n := range names {
		alertNames = append(alertNames, n)
	}
	sort.Strings(alertNames)
	covered := 0
	for _, n := range alertNames {
		if firing[n] == 0 {
			add("alert %s: no promtool test case where it fires", n)
		}
		if quiet[n] == 0 {
			add("alert %s: no promtool test case where it does not fire", n)
		}
		if firing[n] > 0 && quiet[n] > 0 {
			covered++
		}
	}
	fmt.Printf("promcheck static: %d dashboards, %d panels, %d alerts (%d with a firing and a not-firing promtool case), %d expressions parsed, %d vector selectors\n",
		len(dashboards), panels, len(alertNames), covered, exprs, selectors)
	return problems
}

// checkDatasources requires every `datasource` field to be the `${datasource}` variable.
func checkDatasources(file string, node any, path string, problems *[]string) {
	switch n := node.(type) {
	case map[string]any:
		for k, v := range n {
			p := path + "." + k
			if k == "datasource" {
				uid := ""
				switch ds := v.(type) {
				case string:
					uid = ds
				case map[string]any:
					uid, _ = ds["uid"].(string)
					if t, _ := ds["type"].(string); t != "prometheus" {
						*problems = append(*problems, fmt.Sprintf("%s: %s: datasource type %q, want prometheus", file, p, t))
					}
				}
				if uid != "${datasource}" && uid != "$datasource" {
					*problems = append(*problems, fmt.Sprintf("%s: %s: datasource uid %q is hard-coded (use ${datasource})", file, p, uid))
				}
				continue
			}
			checkDatasources(file, v, p, problems)
		}
	case []any:
		for i, v := range n {
			checkDatasources(file, v, fmt.Sprintf("%s[%d]", path, i), problems)
		}
	}
}

func checkPanelIDs(d *Dashboard, problems *[]string) {
	seen := map[float64]bool{}
	var walk func([]any)
	walk = func(panels []any) {
		for _, p := range panels {
			panel, _ := p.(map[string]any)
			if panel == nil {
				continue
			}
			id, ok := panel["id"].(float64)
			if !ok {
				*problems = append(*problems, fmt.Sprintf("%s: panel %v has no id", d.File, panel["title"]))
			} else if seen[id] {
				*problems = append(*problems, fmt.Sprintf("%s: panel id %v used twice", d.File, id))
			}
			seen[id] = true
			if nested, ok := panel["panels"].([]any); ok {
				walk(nested)
			}
		}
	}
	panels, _ := d.raw["panels"].([]any)
	walk(panels)
}

// headingAnchors returns the GitHub-style anchors of a Markdown file's headings.
func headingAnchors(md string) map[string]bool {
	anchors := map[string]bool{}
	drop := regexp.MustCompile(`[^\p{L}\p{N}\- _]`)
	inFence := false
	for _, line := range strings.Split(md, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inFence = !inFence
			continue
		}
		if inFence || !strings.HasPrefix(line, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(line, "#"))
		slug := strings.ToLower(title)
		slug = drop.ReplaceAllString(slug, "")
		slug = strings.ReplaceAll(slug, " ", "-")
		anchors[slug] = true
	}
	return anchors
}

// ---- live ------------------------------------------------------------------------------

type client struct {
	base string
	http *http.Client
}

type apiResponse struct {
	Status    string          `json:"status"`
	Data      json.RawMessage `json:"data"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
}

func (c *client) get(path string, params url.Values) (json.RawMessage, error) {
	resp, err := c.http.Get(c.base + path + "?" + params.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r apiResponse
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, fmt.Errorf("HTTP %d: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s", r.ErrorType, r.Error)
	}
	return r.Data, nil
}

// seriesParams is a /api/v1/series or label-values window: the last 10 minutes.
func seriesParams(match string) url.Values {
	now := time.Now()
	return url.Values{
		"match[]": {match},
		"start":   {fmt.Sprint(now.Add(-10 * time.Minute).Unix())},
		"end":     {fmt.Sprint(now.Unix())},
	}
}

// matchString renders matchers as a series selector: {__name__="x", a=~"b"}.
func matchString(ms []*labels.Matcher) string {
	parts := make([]string, 0, len(ms))
	for _, m := range ms {
		parts = append(parts, m.String())
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ", ") + "}"
}

// Report is the JSON report of a live run.
type Report struct {
	Dashboards       int                 `json:"dashboards"`
	Panels           int                 `json:"panels"`
	Alerts           int                 `json:"alerts"`
	Variables        map[string]string   `json:"variables"`
	Selectors        int                 `json:"selectors"`
	DistinctSelector int                 `json:"distinctSelectors"`
	Missing          map[string][]string `json:"missing"`
	Pending          map[string][]string `json:"pendingSkipped"`
	Expressions      int                 `json:"expressions"`
	ExprErrors       map[string]string   `json:"expressionErrors"`
	RulesHealthy     int                 `json:"rulesHealthy"`
}

func live(base string, dashboards []*Dashboard, alerts []Alert, pending map[string]bool, jsonOut string, rulesLoaded bool) []string {
	c := &client{base: base, http: &http.Client{Timeout: 20 * time.Second}}
	var problems []string
	report := Report{
		Dashboards: len(dashboards),
		Variables:  map[string]string{},
		Missing:    map[string][]string{},
		Pending:    map[string][]string{},
		ExprErrors: map[string]string{},
	}
	uses := map[string][]string{} // series selector -> where used
	order := []string{}
	fromRule := map[string]bool{}   // selectors an alert or recording rule uses
	metricOf := map[string]string{} // selector -> its metric name
	use := func(ms []*labels.Matcher, where string, rule bool) {
		sel := matchString(ms)
		if _, ok := uses[sel]; !ok {
			order = append(order, sel)
			metricOf[sel] = selectorMetric(ms)
		}
		uses[sel] = append(uses[sel], where)
		fromRule[sel] = fromRule[sel] || rule
		report.Selectors++
	}
	type evaluation struct{ where, query string }
	var evaluations []evaluation

	for _, d := range dashboards {
		report.Panels += d.Panels
		values := map[string]string{}
		for _, v := range d.Vars {
			switch v.Type {
			case "datasource":
				continue
			case "custom", "interval", "constant", "textbox":
				if len(v.Options) > 0 {
					values[v.Name] = v.Options[0]
				} else {
					values[v.Name] = v.Query
				}
			case "query":
				sel, label, ok := labelValuesQuery(v.Query)
				if !ok {
					problems = append(problems, fmt.Sprintf("%s: variable %s: unsupported query %q", d.File, v.Name, v.Query))
					continue
				}
				where := fmt.Sprintf("%s / variable %s", d.File, v.Name)
				params := url.Values{}
				if sel != "" {
					sel = substitute(sel, values)
					expr, err := promqlParser.ParseExpr(sel)
					if err != nil {
						problems = append(problems, fmt.Sprintf("%s: %v", where, err))
						continue
					}
					for _, ms := range parser.ExtractSelectors(expr) {
						use(ms, where, false)
					}
					params = seriesParams(sel)
				}
				data, err := c.get("/api/v1/label/"+label+"/values", params)
				var vals []string
				if err == nil {
					err = json.Unmarshal(data, &vals)
				}
				if err != nil || len(vals) == 0 {
					problems = append(problems, fmt.Sprintf("%s: label_values gave no value (%v): panels using $%s cannot be checked with a real value", where, err, v.Name))
					values[v.Name] = "no-value"
					continue
				}
				sort.Strings(vals)
				values[v.Name] = vals[0]
			}
			report.Variables[d.File+" $"+v.Name] = values[v.Name]
		}
		for _, e := range d.Exprs {
			q := substitute(e.Query, values)
			evaluations = append(evaluations, evaluation{e.Where, q})
			expr, err := promqlParser.ParseExpr(q)
			if err != nil {
				report.ExprErrors[e.Where] = err.Error()
				continue
			}
			for _, ms := range parser.ExtractSelectors(expr) {
				use(ms, e.Where, false)
			}
		}
	}
	alertNames := map[string]bool{}
	for _, a := range alerts {
		where := fmt.Sprintf("%s / alert %s", a.File, a.Name)
		if a.Record != "" {
			where = fmt.Sprintf("%s / record %s", a.File, a.Record)
		} else {
			report.Alerts++
			alertNames[a.Name] = true
		}
		evaluations = append(evaluations, evaluation{where, a.Expr})
		expr, err := promqlParser.ParseExpr(a.Expr)
		if err != nil {
			report.ExprErrors[where] = err.Error()
			continue
		}
		for _, ms := range parser.ExtractSelectors(expr) {
			use(ms, where, true)
		}
	}

	report.DistinctSelector = len(order)
	for _, sel := range order {
		data, err := c.get("/api/v1/series", seriesParams(sel))
		var series []map[string]string
		if err == nil {
			err = json.Unmarshal(data, &series)
		}
		if err != nil {
			report.Missing[sel] = append([]string{"error: " + err.Error()}, uses[sel]...)
			continue
		}
		isPending := pending[metricOf[sel]] && !fromRule[sel]
		switch {
		case len(series) == 0 && isPending:
			report.Pending[sel] = uses[sel]
		case len(series) == 0:
			report.Missing[sel] = uses[sel]
		case isPending:
			problems = append(problems, fmt.Sprintf("%s has series now (%s): take it off dashboards/pending-metrics.txt so that the live check covers it", metricOf[sel], sel))
		}
	}
	now := fmt.Sprint(time.Now().Unix())
	for _, e := range evaluations {
		report.Expressions++
		if _, failed := report.ExprErrors[e.where]; failed {
			continue
		}
		if _, err := c.get("/api/v1/query", url.Values{"query": {e.query}, "time": {now}}); err != nil {
			report.ExprErrors[e.where] = err.Error()
		}
	}
	if rulesLoaded {
		problems = append(problems, checkRuleHealth(c, alertNames, &report)...)
	}

	missing := make([]string, 0, len(report.Missing))
	for sel := range report.Missing {
		missing = append(missing, sel)
	}
	sort.Strings(missing)
	for _, sel := range missing {
		problems = append(problems, fmt.Sprintf("no series for %s (used by %s)", sel, strings.Join(dedupe(report.Missing[sel]), "; ")))
	}
	var failed []string
	for where := range report.ExprErrors {
		failed = append(failed, where)
	}
	sort.Strings(failed)
	for _, where := range failed {
		problems = append(problems, fmt.Sprintf("%s: expression failed: %s", where, report.ExprErrors[where]))
	}
	vars := make([]string, 0, len(report.Variables))
	for k, v := range report.Variables {
		vars = append(vars, fmt.Sprintf("%s=%s", k, v))
	}
	sort.Strings(vars)
	fmt.Printf("promcheck live: variables resolved as in Grafana: %s\n", strings.Join(vars, ", "))
	if len(report.Pending) > 0 {
		fmt.Printf("promcheck live: skipped, not exported yet (dashboards/pending-metrics.txt): %s\n",
			strings.Join(sortedKeys(report.Pending), ", "))
	}
	fmt.Printf("promcheck live: %d dashboards, %d panels, %d alerts; %d vector selectors (%d distinct): %d distinct found, %d missing, %d pending; %d expressions evaluated: %d ok, %d failed",
		report.Dashboards, report.Panels, report.Alerts, report.Selectors, report.DistinctSelector,
		report.DistinctSelector-len(report.Missing)-len(report.Pending), len(report.Missing), len(report.Pending),
		report.Expressions, report.Expressions-len(report.ExprErrors), len(report.ExprErrors))
	if rulesLoaded {
		fmt.Printf("; %d alert rules loaded by Prometheus and healthy", report.RulesHealthy)
	}
	fmt.Println()
	if jsonOut != "" {
		b, _ := json.MarshalIndent(report, "", "  ")
		if err := os.WriteFile(jsonOut, b, 0o644); err != nil {
			problems = append(problems, err.Error())
		}
	}
	return problems
}

func checkRuleHealth(c *client, want map[string]bool, report *Report) []string {
	data, err := c.get("/api/v1/rules", url.Values{"type": {"alert"}})
	if err != nil {
		return []string{"reading /api/v1/rules: " + err.Error()}
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Name      string `json:"name"`
				Health    string `json:"health"`
				LastError string `json:"lastError"`
			} `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(data, &rules); err != nil {
		return []string{"reading /api/v1/rules: " + err.Error()}
	}
	var problems []string
	seen := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			seen[r.Name] = true
			if r.Health != "ok" {
				problems = append(problems, fmt.Sprintf("alert %s: Prometheus rule health %q %s", r.Name, r.Health, r.LastError))
			} else {
				report.RulesHealthy++
			}
		}
	}
	for name := range want {
		if !seen[name] {
			problems = append(problems, fmt.Sprintf("alert %s: not loaded by Prometheus", name))
		}
	}
	return problems
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func dedupe(xs []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range xs {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}
