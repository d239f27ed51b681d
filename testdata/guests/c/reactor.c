// reactor is a WASI reactor (a library-style module with _initialize and
// no _start), built with -mexec-model=reactor: ftvm must refuse it clearly.
int add(int a, int b) { return a + b; }
