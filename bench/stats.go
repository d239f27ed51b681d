package main

import (
	"fmt"
	"math"
	"sort"
)

// sample is a set of measurements of one quantity.
type sample []float64

// sorted returns the measurements in order, leaving out NaN (a round that
// had nothing to measure).
func (s sample) sorted() sample {
	c := make(sample, 0, len(s))
	for _, v := range s {
		if !math.IsNaN(v) {
			c = append(c, v)
		}
	}
	sort.Float64s(c)
	return c
}

func (s sample) median() float64 {
	c := s.sorted()
	n := len(c)
	if n == 0 {
		return math.NaN()
	}
	if n%2 == 1 {
		return c[n/2]
	}
	return (c[n/2-1] + c[n/2]) / 2
}

func (s sample) min() float64 {
	c := s.sorted()
	if len(c) == 0 {
		return math.NaN()
	}
	return c[0]
}

func (s sample) max() float64 {
	c := s.sorted()
	if len(c) == 0 {
		return math.NaN()
	}
	return c[len(c)-1]
}

// quantile is the q-quantile (0..1) by the nearest-rank method.
func (s sample) quantile(q float64) float64 {
	c := s.sorted()
	if len(c) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(q*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

// durations formats seconds as a human duration with 3 significant digits.
func fmtSeconds(sec float64) string {
	switch {
	case math.IsNaN(sec):
		return "—"
	case sec < 0:
		return "−" + fmtSeconds(-sec)
	case sec >= 1:
		return fmt.Sprintf("%.3g s", sec)
	case sec >= 1e-3:
		return fmt.Sprintf("%.3g ms", sec*1e3)
	case sec >= 1e-6:
		return fmt.Sprintf("%.3g µs", sec*1e6)
	}
	return fmt.Sprintf("%.3g ns", sec*1e9)
}

// fmtRatio formats a/b as "×1.23".
func fmtRatio(a, b float64) string {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return "—"
	}
	r := a / b
	if r >= 10 {
		return fmt.Sprintf("×%.0f", r)
	}
	return fmt.Sprintf("×%.2f", r)
}

// fmtNum formats a count with thousands separators.
func fmtNum(v float64) string {
	if math.IsNaN(v) {
		return "—"
	}
	n := int64(math.Round(v))
	s := fmt.Sprint(n)
	if n < 0 {
		return "-" + fmtNum(float64(-n))
	}
	out := ""
	for len(s) > 3 {
		out = " " + s[len(s)-3:] + out
		s = s[:len(s)-3]
	}
	return s + out
}

// fmtNs formats nanoseconds per operation.
func fmtNs(ns float64) string {
	if math.IsNaN(ns) {
		return "—"
	}
	if ns >= 100 {
		return fmt.Sprintf("%.0f", ns)
	}
	return fmt.Sprintf("%.1f", ns)
}
