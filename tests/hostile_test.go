package tests

import (
	"bufio"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ftvm/ftvm/machine"
	"github.com/ftvm/ftvm/wasi"
)

// The hostile guests (testdata/guests/c/hostile_*.c) print "name: ERRNO"
// per attempt. These tables say which results are acceptable for each; an
// attempt missing from the output fails the test too, so a guest that
// stops early cannot pass.

// escape is how an attempt to leave the preopened directory must fail.
var escape = []string{"ENOTCAPABLE", "EPERM"}

// followOut is how following a symlink that leads outside must fail.
// ELOOP is what a host that refuses to follow symlinks at all reports.
var followOut = []string{"ENOTCAPABLE", "EPERM", "ELOOP"}

func anyOf(sets ...[]string) []string {
	var out []string
	for _, s := range sets {
		out = append(out, s...)
	}
	return out
}

var hostileMemWant = map[string][]string{
	"write_iovs_cross_end":         {"EFAULT"},
	"write_iovs_wrap":              {"EFAULT"},
	"write_iovs_len_wraps":         {"EINVAL", "EFAULT"},
	"write_iovs_len_max":           {"EINVAL", "EFAULT"},
	"write_iovs_1025":              {"EINVAL"},
	"write_iovs_1024_empty":        {"SUCCESS"},
	"write_buf_wrap":               {"EFAULT"},
	"write_buf_len_max":            {"EFAULT"},
	"write_buf_cross_end":          {"EFAULT"},
	"write_empty_buf_past_end":     {"EFAULT", "SUCCESS"},
	"write_second_iov_bad":         {"EFAULT"},
	"write_result_ptr_bad":         {"EFAULT"},
	"write_result_ptr_cross_end":   {"EFAULT"},
	"write_buf_at_end":             {"SUCCESS"},
	"read_iovs_bad":                {"EFAULT"},
	"read_buf_cross_end":           {"EFAULT"},
	"args_sizes_bad":               {"EFAULT"},
	"args_sizes_bad2":              {"EFAULT"},
	"args_get_argv_bad":            {"EFAULT"},
	"args_get_buf_bad":             {"EFAULT"},
	"args_get_buf_cross_end":       {"EFAULT"},
	"environ_sizes_bad":            {"EFAULT"},
	"environ_get_argv_bad":         {"EFAULT"},
	"environ_get_buf_bad":          {"EFAULT"},
	"clock_time_bad_ptr":           {"EFAULT"},
	"clock_time_cross_end":         {"EFAULT"},
	"clock_time_bad_id":            {"EINVAL"},
	"clock_res_bad_ptr":            {"EFAULT"},
	"clock_res_bad_id":             {"EINVAL"},
	"random_cross_end":             {"EFAULT"},
	"random_len_max":               {"EFAULT"},
	"random_wrap":                  {"EFAULT"},
	"random_empty_ok":              {"SUCCESS"},
	"prestat_get_bad":              {"EFAULT"},
	"prestat_get_not_preopen":      {"EBADF"},
	"prestat_dir_name_bad":         {"EFAULT"},
	"prestat_dir_name_len_max":     {"SUCCESS", "EFAULT"},
	"fdstat_get_bad":               {"EFAULT"},
	"host_fds_4_to_1023":           {"EBADF"},
	"write_fd_max":                 {"EBADF"},
	"write_fd_int_max":             {"EBADF"},
	"close_fd_max":                 {"EBADF"},
	"close_fd_65536":               {"EBADF"},
	"renumber_to_unopened":         {"EBADF"},
	"renumber_from_unopened":       {"EBADF"},
	"fdstat_set_rights_gain":       {"ENOTCAPABLE"},
	"sock_accept_on_dir":           {"ENOTSOCK"},
	"sock_recv_on_stdout":          {"ENOTSOCK"},
	"sock_send_on_stdout":          {"ENOTSOCK"},
	"sock_shutdown_on_stdout":      {"ENOTSOCK"},
	"proc_raise_kill":              {"ENOSYS", "ENOTSUP"},
	"poll_nsubs_max":               {"EFAULT", "EINVAL"},
	"poll_nsubs_wraps":             {"EFAULT", "EINVAL"},
	"poll_nsubs_zero":              {"EINVAL"},
	"poll_in_bad":                  {"EFAULT"},
	"poll_out_bad":                 {"EFAULT"},
	"poll_nevents_bad":             {"EFAULT"},
	"poll_clock_1ms":               {"SUCCESS"},
	"poll_bad_eventtype":           {"EINVAL"},
	"open_inside_ok":               {"SUCCESS"},
	"open_path_wrap":               {"EFAULT"},
	"open_path_len_max":            {"EFAULT", "ENAMETOOLONG"},
	"open_path_cross_end":          {"EFAULT"},
	"open_creat_result_bad":        {"EFAULT"},
	"mkdir_path_cross_end":         {"EFAULT"},
	"filestat_path_bad":            {"EFAULT"},
	"filestat_buf_bad":             {"EFAULT"},
	"readlink_buf_bad":             {"EFAULT"},
	"symlink_old_bad":              {"EFAULT"},
	"rename_new_bad":               {"EFAULT"},
	"unlink_path_bad":              {"EFAULT"},
	"set_times_both_now_and_value": {"EINVAL"},
	"readdir_buf_cross_end":        {"EFAULT"},
	"readdir_len_max":              {"EFAULT"},
	"readdir_used_bad":             {"EFAULT"},
	// SUCCESS here means "an empty listing" (the guest checks bufused).
	"readdir_cookie_max":       {"SUCCESS", "EINVAL"},
	"readdir_cookie_2p32":      {"SUCCESS", "EINVAL"},
	"readdir_cookie_negative":  {"SUCCESS", "EINVAL"},
	"pread_iovs_bad":           {"EFAULT"},
	"pread_buf_bad":            {"EFAULT"},
	"pread_offset_negative":    {"EINVAL"},
	"pread_result_bad":         {"EFAULT"},
	"pwrite_offset_negative":   {"EINVAL"},
	"pwrite_buf_bad":           {"EFAULT"},
	"seek_negative":            {"EINVAL"},
	"seek_bad_whence":          {"EINVAL"},
	"seek_result_bad":          {"EFAULT"},
	"seek_cur_overflow":        {"EINVAL", "EOVERFLOW"},
	"tell_result_bad":          {"EFAULT"},
	"filestat_get_bad":         {"EFAULT"},
	"set_size_negative":        {"EINVAL", "EFBIG"},
	"allocate_negative_len":    {"EINVAL", "EFBIG"},
	"advise_bad_advice":        {"EINVAL"},
	"fdstat_set_rights_regain": {"ENOTCAPABLE"},
	"write_without_right":      {"EBADF", "ENOTCAPABLE"},
	"close_file":               {"SUCCESS"},
	"close_file_twice":         {"EBADF"},
	"close_preopen":            {"SUCCESS"},
	"open_after_close_preopen": {"EBADF"},
	"close_stdin":              {"SUCCESS"},
	"read_closed_stdin":        {"EBADF"},
}

// hostileFsWant holds the fixed expectations of hostile_fs; attempts that
// depend on whether an earlier symlink could be created are in
// hostileFsDependent.
var hostileFsWant = map[string][]string{
	"ok_inside":                     {"SUCCESS"},
	"ok_dot_slash":                  {"SUCCESS"},
	"ok_sub_dotdot":                 {"SUCCESS"},
	"ok_dot_dir":                    {"SUCCESS"},
	"dotdot_secret":                 escape,
	"dot_dotdot_secret":             escape,
	"sub_dotdot_dotdot_secret":      escape,
	"open_dotdot_dir":               escape,
	"open_sub_dotdot_dotdot_dir":    escape,
	"deep_dotdot_secret":            escape,
	"dotdot_box_inside":             anyOf(escape, []string{"SUCCESS"}),
	"abs_etc_passwd":                escape,
	"abs_secret":                    escape,
	"abs_root_dotdot":               escape,
	"nul_in_path":                   anyOf(escape, []string{"EINVAL", "EILSEQ", "ENOENT"}),
	"creat_dotdot":                  escape,
	"creat_sub_dotdot":              escape,
	"creat_abs":                     escape,
	"mkdir_dotdot":                  escape,
	"mkdir_abs":                     escape,
	"symlink_rel_create":            anyOf(escape, []string{"SUCCESS"}),
	"symlink_abs_create":            anyOf(escape, []string{"SUCCESS"}),
	"symlink_abs_secret_create":     anyOf(escape, []string{"SUCCESS"}),
	"symlink_chain_create1":         {"SUCCESS"},
	"symlink_chain_create2":         anyOf(escape, []string{"SUCCESS"}),
	"symlink_dir_create":            anyOf(escape, []string{"SUCCESS"}),
	"symlink_in_sub_create":         anyOf(escape, []string{"SUCCESS"}),
	"symlink_create_outside":        escape,
	"symlink_dangling_create":       anyOf(escape, []string{"SUCCESS"}),
	"hostlink_abs_follow":           followOut,
	"hostlink_rel_follow":           followOut,
	"hostdir_file":                  followOut,
	"hostdir_creat":                 followOut,
	"readlink_hostlink_rel":         {"SUCCESS"},
	"stat_dotdot_secret":            escape,
	"stat_hostdir_file":             followOut,
	"utimes_dotdot_secret":          escape,
	"utimes_hostlink_abs":           followOut,
	"trunc_hostlink_abs":            followOut,
	"write_open_hostlink_rel":       followOut,
	"link_follow_lnk_rel_open":      {"ENOENT"},
	"link_follow_hostlink_abs":      anyOf(followOut, []string{"ENOTSUP"}),
	"link_follow_hostlink_abs_open": {"ENOENT"},
	"link_dotdot_secret":            escape,
	"link_to_outside":               escape,
	"rename_prep":                   {"SUCCESS"},
	"rename_to_outside":             escape,
	"rename_from_outside":           escape,
	"rename_into_hostdir":           followOut,
	"rename_over_preopen":           anyOf(escape, []string{"EBUSY", "EINVAL", "EEXIST", "ENOTEMPTY", "EISDIR"}),
	"rename_dir_into_itself":        anyOf(escape, []string{"EINVAL"}),
	"unlink_dotdot_secret":          escape,
	"unlink_hostdir_file":           followOut,
	"rmdir_dotdot_outside":          escape,
	"rmdir_dot":                     anyOf(escape, []string{"EINVAL", "EBUSY", "ENOTEMPTY"}),
	"rmdir_hostdir_symlink":         anyOf(escape, []string{"ENOTDIR"}),
	"open_sub_dir":                  {"SUCCESS"},
	"subfd_dotdot_dotdot_secret":    escape,
	"subfd_abs_secret":              escape,
	"subfd_dotdot_inside":           anyOf(escape, []string{"SUCCESS"}),
	"open_on_stdout":                {"ENOTDIR", "EBADF", "ENOTCAPABLE"},
	"readdir_stdout":                {"ENOTDIR", "EBADF", "ENOTCAPABLE"},
	"open_long_name":                {"ENAMETOOLONG"},
	"mkdir_long_path":               {"ENAMETOOLONG", "ENOENT"},
}

// hostileFsDependent: attempt -> (the symlink creation it depends on, what
// is acceptable). If the symlink could not be created, ENOENT is fine too.
var hostileFsDependent = map[string]struct {
	on   string
	want []string
}{
	"symlink_rel_follow":          {"symlink_rel_create", followOut},
	"symlink_rel_nofollow":        {"symlink_rel_create", []string{"ELOOP", "ENOTCAPABLE", "EPERM"}},
	"symlink_abs_follow":          {"symlink_abs_create", followOut},
	"symlink_abs_secret_follow":   {"symlink_abs_secret_create", followOut},
	"symlink_chain_follow":        {"symlink_chain_create2", followOut},
	"symlink_dir_secret":          {"symlink_dir_create", followOut},
	"symlink_dir_secret_nofollow": {"symlink_dir_create", followOut},
	"symlink_dir_creat":           {"symlink_dir_create", followOut},
	"symlink_dir_mkdir":           {"symlink_dir_create", followOut},
	"symlink_in_sub_follow":       {"symlink_in_sub_create", followOut},
	"symlink_dangling_creat":      {"symlink_dangling_create", followOut},
	"stat_follow_lnk_rel":         {"symlink_rel_create", followOut},
	"stat_nofollow_lnk_rel":       {"symlink_rel_create", []string{"SUCCESS"}},
	"utimes_follow_lnk_rel":       {"symlink_rel_create", followOut},
	"trunc_follow_lnk_rel":        {"symlink_rel_create", followOut},
	"link_follow_lnk_rel":         {"symlink_rel_create", anyOf(followOut, []string{"ENOTSUP"})},
	"rename_via_dlnk":             {"symlink_dir_create", followOut},
	"unlink_via_dlnk":             {"symlink_dir_create", followOut},
}

// parseResults reads "name: ERRNO" lines; other lines (markers, data the
// guest read) are ignored here and checked separately.
func parseResults(t *testing.T, out string) map[string]string {
	t.Helper()
	got := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		name, res, ok := strings.Cut(sc.Text(), ": ")
		if !ok || strings.ContainsAny(res, " \"") {
			continue
		}
		if prev, dup := got[name]; dup {
			t.Errorf("%s reported twice (%s, %s)", name, prev, res)
		}
		got[name] = res
	}
	return got
}

func checkResults(t *testing.T, got map[string]string, want map[string][]string) {
	t.Helper()
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		res, ok := got[n]
		if !ok {
			t.Errorf("%s: not reported (the guest stopped early?)", n)
			continue
		}
		if !contains(want[n], res) {
			t.Errorf("%s: got %s, want one of %v", n, res, want[n])
		}
	}
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}

// hostileLayout builds the host side of a hostile run: root/secret and
// root/outside/o.txt beside root/box, the directory the guest gets, which
// holds inside.txt, sub/, a harmless symlink and symlinks the host planted
// that lead outside.
func hostileLayout(t *testing.T) (root, box string) {
	t.Helper()
	root = t.TempDir()
	box = filepath.Join(root, "box")
	writeFile(t, filepath.Join(root, "secret"), "TOP SECRET\n")
	writeFile(t, filepath.Join(root, "outside", "o.txt"), "outside\n")
	writeFile(t, filepath.Join(box, "inside.txt"), "inside\n")
	if err := os.Mkdir(filepath.Join(box, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	for link, target := range map[string]string{
		"link":         "inside.txt",
		"hostlink_abs": filepath.Join(root, "secret"),
		"hostlink_rel": "../secret",
		"hostdir":      "../outside",
	} {
		if err := os.Symlink(target, filepath.Join(box, link)); err != nil {
			t.Fatal(err)
		}
	}
	return root, box
}

// checkOutsideUntouched asserts that nothing beside the preopened
// directory was read into the guest's output, created, removed or changed.
func checkOutsideUntouched(t *testing.T, root string, before map[string]treeEntry, stdout string) {
	t.Helper()
	after := snapshotTree(t, root)
	// Only what is outside box matters here; box is the guest's.
	outside := func(m map[string]treeEntry) map[string]treeEntry {
		o := map[string]treeEntry{}
		for p, e := range m {
			if p != "box" && !strings.HasPrefix(p, "box/") {
				o[p] = e
			}
		}
		return o
	}
	for _, d := range diffTrees(outside(before), outside(after)) {
		t.Errorf("outside the sandbox: %s", d)
	}
	// The host's planted symlinks must still point where they did.
	for _, p := range []string{"box/hostlink_abs", "box/hostlink_rel", "box/hostdir"} {
		if b, a := before[p], after[p]; a.kind != "symlink" || a.content != b.content {
			t.Errorf("%s: was %v, now %v", p, b, a)
		}
	}
	for _, leak := range []string{"TOP SECRET", "outside|", "root:"} {
		if strings.Contains(stdout, leak) {
			t.Errorf("guest output contains %q: it read something outside the sandbox", leak)
		}
	}
	if entries, err := os.ReadDir(root); err != nil {
		t.Error(err)
	} else {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if got := strings.Join(names, " "); got != "box outside secret" {
			t.Errorf("parent directory holds %q, want only \"box outside secret\"", got)
		}
	}
}

// hostileRun runs a hostile guest on box (as /sandbox) through the
// library or the ftvm binary. The library run catches a panic ftvm would
// recover from; the binary run catches a crash that kills the process.
func hostileRun(t *testing.T, via, wasmPath, box string, args ...string) (stdout string) {
	t.Helper()
	env := []string{"SOME=environment", "MORE=values"}
	if via == "cli" {
		cli := []string{"run", "--dir", box + ":/sandbox"}
		for _, e := range env {
			cli = append(cli, "--env", e)
		}
		res := runCLI(t, time.Minute, "", append(append(cli, wasmPath), args...)...)
		if res.code != 0 {
			t.Errorf("exit %d\nstderr:\n%s", res.code, res.stderr)
		}
		checkNoHostPanic(t, res.stderr, false)
		return res.stdout
	}
	res := runLib(t, time.Minute, machine.Config{Module: readModule(t, wasmPath), Name: filepath.Base(wasmPath),
		Args: args, Env: env, Dirs: []wasi.Preopen{{HostPath: box, GuestPath: "/sandbox"}}})
	if res.err != nil || res.code != 0 {
		t.Errorf("exit %d, err %v\nstderr:\n%s", res.code, res.err, res.stderr)
	}
	checkNoHostPanic(t, res.stderr, false)
	return res.stdout
}

// TestHostileMemory: every bad pointer, length, count and descriptor gets
// the right errno, no byte of a failed write is written, and failed calls
// create nothing, anywhere.
func TestHostileMemory(t *testing.T) {
	wasm := cGuest(t, "hostile_mem", []string{"hostile_mem.c", "wasierr.c"})
	for _, via := range []string{"library", "cli"} {
		t.Run(via, func(t *testing.T) {
			root, box := hostileLayout(t)
			before := snapshotTree(t, root)
			out := hostileRun(t, via, wasm, box)
			checkResults(t, parseResults(t, out), hostileMemWant)
			if strings.Contains(out, "LEAK-MARKER") {
				t.Error("bytes of a write that failed reached stdout")
			}
			if !strings.Contains(out, "@EOM-OK\n") {
				t.Error("a write of the last bytes of memory did not reach stdout")
			}
			if !strings.HasSuffix(out, "done\n") {
				t.Error("the guest did not finish")
			}
			// The whole tree, box included, is as it was.
			for _, d := range diffTrees(before, snapshotTree(t, root)) {
				t.Errorf("after failed calls: %s", d)
			}
			if t.Failed() {
				t.Logf("guest stdout:\n%s", out)
			}
		})
	}
}

// TestHostileSandbox: every way out of the preopened directory fails, no
// secret reaches the guest, and the parent directory is exactly as before.
func TestHostileSandbox(t *testing.T) {
	wasm := cGuest(t, "hostile_fs", []string{"hostile_fs.c", "wasierr.c"})
	for _, via := range []string{"library", "cli"} {
		t.Run(via, func(t *testing.T) {
			root, box := hostileLayout(t)
			before := snapshotTree(t, root)
			out := hostileRun(t, via, wasm, box, filepath.Join(root, "secret"))
			got := parseResults(t, out)
			checkResults(t, got, hostileFsWant)
			for name, dep := range hostileFsDependent {
				want := dep.want
				if got[dep.on] != "SUCCESS" {
					want = anyOf(want, []string{"ENOENT"})
				}
				checkResults(t, got, map[string][]string{name: want})
			}
			if !strings.HasSuffix(out, "done\n") {
				t.Error("the guest did not finish")
			}
			checkOutsideUntouched(t, root, before, out)
			if t.Failed() {
				t.Logf("guest stdout:\n%s", out)
			}
		})
	}
}
