// SPDX-License-Identifier: Apache-2.0
/*
 * kfload: the benchmark's HTTP load generator (one thread, epoll).
 *
 * Why not wrk: wrk starts its latency clock when the request is written, after
 * the TCP handshake, so a gateway's per-connection cost (the SYN's path, a SYN
 * dropped or retransmitted) is invisible in its latency. kfload starts the clock
 * before connect() in close mode, so a new connection's latency is what a user
 * waits for: handshake, request, whole response.
 *
 *   kfload -a ADDR -p PORT [-c CONNS] [-d SECONDS] [-w WARMUP] [-k] [-t TIMEOUT_MS] [-n COUNT]
 *
 *   -n COUNT: every connection goes to one of COUNT consecutive addresses
 *     from ADDR, drawn at random (default 1: ADDR only); e.g. a random VIP of
 *     COUNT services whose VIPs are consecutive.
 *   close mode (default): every request on a new connection ("Connection:
 *     close"); the client reads until the server closes, so the server is the
 *     active closer and the client holds no TIME_WAIT (it can reuse its ports
 *     at once, which is what makes a gateway see reused 4-tuples).
 *   -k: keep-alive, CONNS connections opened once, requests back to back.
 *
 * Prints one JSON object: requests completed in the measured window, rate,
 * latency percentiles (microseconds), and errors by kind. Bounded: at most 60 s
 * of measurement, 4096 connections and 4M latency samples.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define MAX_SAMPLES (4u << 20)
#define BUF 4096

enum state { IDLE, CONNECTING, WRITING, READING };

struct conn {
	int fd;
	enum state st;
	uint64_t start_ns;  /* latency clock: connect() (close) or write (keep-alive) */
	size_t sent;
	size_t got;        /* bytes of the current response */
	long want;         /* header + body length once known, else -1 */
	char buf[BUF];
};

static struct sockaddr_in dst;
static uint32_t first_addr;  /* host order */
static uint32_t naddrs = 1;
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static int keepalive;
static long timeout_ns = 3000000000L;
static char request[256];
static size_t request_len;
static struct conn conns[MAX_CONNS];
static uint32_t *samples;
static size_t nsamples;
static uint64_t measure_from, measure_to;
static unsigned long completed, err_connect, err_reset, err_timeout, err_short, err_http;
static int epfd;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int counting(uint64_t t) { return t >= measure_from && t < measure_to; }

static void arm(struct conn *c, uint32_t events, int op)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };
	if (epoll_ctl(epfd, op, c->fd, &ev) < 0) {
		perror("epoll_ctl");
		exit(2);
	}
}

static void close_conn(struct conn *c)
{
	if (c->fd >= 0) {
		close(c->fd);  /* closing also removes it from the epoll set */
		c->fd = -1;
	}
	c->st = IDLE;
}

static void start_request(struct conn *c, uint64_t t)
{
	c->sent = 0;
	c->got = 0;
	c->want = -1;
	c->st = WRITING;
	if (keepalive)
		c->start_ns = t;
}

/* xorshift64*: cheap, and good enough to spread connections over addresses. */
static uint32_t next_random(void)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static void open_conn(struct conn *c)
{
	uint64_t t = now_ns();
	if (naddrs > 1)
		dst.sin_addr.s_addr = htonl(first_addr + next_random() % naddrs);
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		perror("socket");
		exit(2);
	}
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->start_ns = t;
	c->st = CONNECTING;
	if (connect(c->fd, (struct sockaddr *)&dst, sizeof(dst)) < 0 && errno != EINPROGRESS) {
		if (counting(t))
			err_connect++;
		close(c->fd);
		c->fd = -1;
		c->st = IDLE;  /* retried by the idle sweep */
		return;
	}
	arm(c, EPOLLOUT, EPOLL_CTL_ADD);
}

static void record(struct conn *c, uint64_t t)
{
	if (!counting(t))
		return;
	completed++;
	if (nsamples < MAX_SAMPLES) {
		uint64_t us = (t - c->start_ns) / 1000;
		samples[nsamples++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
	}
}

static void fail(struct conn *c, unsigned long *counter, uint64_t t)
{
	if (counting(t))
		(*counter)++;
	close_conn(c);
}

/* The response is complete when its header and Content-Length bytes of body are in. */
static void parse_length(struct conn *c)
{
	char *end = memmem(c->buf, c->got, "\r\n\r\n", 4);
	if (!end)
		return;
	long header = end - c->buf + 4;
	long body = 0;
	for (char *p = c->buf; p < end; p++) {
		if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "content-length:", 15) == 0) {
			body = strtol(p + 15, NULL, 10);
			break;
		}
	}
	c->want = header + body;
}

static void on_event(struct conn *c, uint32_t events)
{
	uint64_t t = now_ns();
	if (c->st == CONNECTING) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err || (events & (EPOLLERR | EPOLLHUP))) {
			fail(c, err == ECONNRESET || err == ECONNREFUSED ? &err_reset : &err_connect, t);
			return;
		}
		start_request(c, t);
	}
	if (c->st == WRITING) {
		ssize_t n = send(c->fd, request + c->sent, request_len - c->sent, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EAGAIN)
				return;
			fail(c, &err_reset, t);
			return;
		}
		c->sent += (size_t)n;
		if (c->sent < request_len) {
			arm(c, EPOLLOUT, EPOLL_CTL_MOD);
			return;
		}
		c->st = READING;
		arm(c, EPOLLIN, EPOLL_CTL_MOD);
		return;
	}
	if (c->st == READING) {
		for (;;) {
			size_t room = sizeof(c->buf) - c->got;
			char scratch[BUF];
			char *into = room ? c->buf + c->got : scratch;
			ssize_t n = recv(c->fd, into, room ? room : sizeof(scratch), 0);
			if (n < 0) {
				if (errno == EAGAIN)
					return;
				fail(c, &err_reset, t);
				return;
			}
			if (n == 0) {  /* the server closed */
				if (c->want < 0)
					parse_length(c);
				if (c->want < 0 || (long)c->got < c->want) {
					fail(c, &err_short, t);
					return;
				}
				if (strncmp(c->buf, "HTTP/1.1 200", 12) && strncmp(c->buf, "HTTP/1.0 200", 12)) {
					fail(c, &err_http, t);
					return;
				}
				record(c, t);
				close_conn(c);
				return;
			}
			c->got += (size_t)n;
			if (c->want < 0)
				parse_length(c);
			if (keepalive && c->want >= 0 && (long)c->got >= c->want) {
				if (strncmp(c->buf, "HTTP/1.1 200", 12)) {
					fail(c, &err_http, t);
					return;
				}
				record(c, t);
				start_request(c, t);
				arm(c, EPOLLOUT, EPOLL_CTL_MOD);
				return;
			}
		}
	}
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static uint32_t pct(double p)
{
	if (!nsamples)
		return 0;
	size_t i = (size_t)(p * (double)(nsamples - 1) + 0.5);
	return samples[i];
}

int main(int argc, char **argv)
{
	const char *addr = NULL;
	int port = 80, nconns = 32, opt;
	double seconds = 2, warmup = 0.5;
	long count = 1;
	while ((opt = getopt(argc, argv, "a:p:c:d:w:kt:n:")) != -1) {
		switch (opt) {
		case 'a': addr = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'c': nconns = atoi(optarg); break;
		case 'd': seconds = atof(optarg); break;
		case 'w': warmup = atof(optarg); break;
		case 'k': keepalive = 1; break;
		case 't': timeout_ns = atol(optarg) * 1000000L; break;
		case 'n': count = atol(optarg); break;
		default:
			fprintf(stderr, "usage: kfload -a ADDR -p PORT [-c CONNS] [-d S] [-w S] [-k] [-t MS] [-n COUNT]\n");
			return 2;
		}
	}
	if (!addr || nconns < 1 || nconns > MAX_CONNS || seconds <= 0 || seconds > 60 || warmup < 0 || warmup > 10 ||
	    count < 1 || count > (1L << 24)) {
		fprintf(stderr, "kfload: need -a ADDR; 1 <= -c <= %d, 0 < -d <= 60, 0 <= -w <= 10, 1 <= -n <= 2^24\n",
			MAX_CONNS);
		return 2;
	}
	memset(&dst, 0, sizeof(dst));
	dst.sin_family = AF_INET;
	dst.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, addr, &dst.sin_addr) != 1) {
		fprintf(stderr, "kfload: bad IPv4 address %s\n", addr);
		return 2;
	}
	first_addr = ntohl(dst.sin_addr.s_addr);
	naddrs = (uint32_t)count;
	if ((uint64_t)first_addr + naddrs - 1 > UINT32_MAX) {
		fprintf(stderr, "kfload: %s + %ld addresses runs past 255.255.255.255\n", addr, count);
		return 2;
	}
	rng_state ^= now_ns();
	request_len = (size_t)snprintf(request, sizeof(request),
				       "GET / HTTP/1.1\r\nHost: %s\r\nUser-Agent: kfload\r\n%s\r\n", addr,
				       keepalive ? "" : "Connection: close\r\n");
	samples = malloc(sizeof(uint32_t) * MAX_SAMPLES);
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!samples || epfd < 0) {
		perror("setup");
		return 2;
	}
	uint64_t t0 = now_ns();
	measure_from = t0 + (uint64_t)(warmup * 1e9);
	measure_to = measure_from + (uint64_t)(seconds * 1e9);
	for (int i = 0; i < nconns; i++) {
		conns[i].fd = -1;
		open_conn(&conns[i]);
	}
	struct epoll_event events[256];
	uint64_t last_sweep = t0;
	for (;;) {
		uint64_t t = now_ns();
		if (t >= measure_to)
			break;
		int n = epoll_wait(epfd, events, 256, 20);
		for (int i = 0; i < n; i++)
			on_event(events[i].data.ptr, events[i].events);
		t = now_ns();
		if (t - last_sweep > 10000000ull) {  /* every 10 ms: reopen closed slots, expire stuck ones */
			last_sweep = t;
			for (int i = 0; i < nconns; i++) {
				struct conn *c = &conns[i];
				if (c->st != IDLE && t - c->start_ns > (uint64_t)timeout_ns)
					fail(c, &err_timeout, t);
			}
		}
		for (int i = 0; i < nconns; i++)
			if (conns[i].st == IDLE)
				open_conn(&conns[i]);
	}
	qsort(samples, nsamples, sizeof(uint32_t), cmp_u32);
	printf("{\"mode\":\"%s\",\"addresses\":%u,\"connections\":%d,\"seconds\":%.3f,\"requests\":%lu,\"rate\":%.1f,"
	       "\"latency_us\":{\"p50\":%u,\"p90\":%u,\"p99\":%u,\"p999\":%u,\"max\":%u},"
	       "\"errors\":{\"connect\":%lu,\"reset\":%lu,\"timeout\":%lu,\"short\":%lu,\"http\":%lu}}\n",
	       keepalive ? "keepalive" : "close", naddrs, nconns, seconds, completed, (double)completed / seconds,
	       pct(0.50), pct(0.90), pct(0.99), pct(0.999), nsamples ? samples[nsamples - 1] : 0,
	       err_connect, err_reset, err_timeout, err_short, err_http);
	return 0;
}
