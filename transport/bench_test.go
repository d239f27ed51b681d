package transport

import (
	"io"
	"testing"
)

func benchLoopback(b *testing.B, client, server *Conn, size int) {
	payload := make([]byte, size)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	done := make(chan error, 1)
	go func() {
		for {
			_, _, err := server.Recv()
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				done <- err
				return
			}
		}
	}()
	b.SetBytes(int64(size))
	b.ResetTimer()
	for b.Loop() {
		if err := client.Send(1, payload); err != nil {
			b.Fatal(err)
		}
	}
	if err := client.CloseWrite(); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// BenchmarkLoopback1MiB sends 1 MiB frames over plain TCP on loopback,
// receiver checking every CRC.
func BenchmarkLoopback1MiB(b *testing.B) {
	client, server := tcpPair(b, Options{})
	benchLoopback(b, client, server, 1<<20)
}

// BenchmarkLoopbackTLS1MiB is the same over mutual TLS 1.3.
func BenchmarkLoopbackTLS1MiB(b *testing.B) {
	dir := b.TempDir()
	ca := newCA(b, "ca")
	scfg, err := ca.issue(b, dir, "primary").ServerConfig()
	if err != nil {
		b.Fatal(err)
	}
	ccfg, err := ca.issue(b, dir, "backup").ClientConfig("primary")
	if err != nil {
		b.Fatal(err)
	}
	client, server := tlsPair(b, scfg, ccfg)
	benchLoopback(b, client, server, 1<<20)
}

func BenchmarkLoopback4KiB(b *testing.B) {
	client, server := tcpPair(b, Options{})
	benchLoopback(b, client, server, 4<<10)
}
