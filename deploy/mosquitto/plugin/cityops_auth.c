/*
 * cityops_auth: authentication and authorization for cityops on Mosquitto 2.0's plugin API v5.
 *
 * Credentials: the `$7$` PBKDF2-SHA512 password files the API and the stack write
 * (cityops.common.mqtt_auth): `service_password_file` (ingest, gateway, dispatcher) and
 * `device_password_file` (one line per device; its username is the device id). Both are
 * stat()ed at most every CHECK_INTERVAL_NS (on the broker's tick, and before each login),
 * re-read when they change, and devices that were removed or got a new password are kicked.
 * There is no signal and no reload.
 *
 * Rules (docs/ARCHITECTURE.md, "The MQTT edge"):
 * - device U writes only city/{kind}/U/telemetry, city/{kind}/U/status and
 *   city/{kind}/U/commands/result, never retained; subscribes to and reads only exact
 *   topics city/{kind}/U/commands[/...]: no wildcards, no $share, no $SYS;
 * - its client id is U or U-suffix, and no other account owns a longer `-` prefix of it;
 *   reserved names (the services' and `reserved_ids`) are never device ids;
 * - at most `max_sessions` connections per device at once;
 * - ingest reads city/{kind}/{id}/telemetry|status|commands/result, shared or not;
 *   gateway writes telemetry and status for any device; dispatcher writes
 *   city/{kind}/{id}/commands[/...] and reads .../commands/result. Services never retain.
 *
 * Publishers wait for ingest after a restart: Mosquitto 2.0 (2.0.21 too, measured) does not
 * save `$share` subscriptions, so after a restart ingest's session comes back without them and
 * every reading PUBACKed before ingest subscribes again is dropped. Once ingest's share group
 * (`ingest_share_group`) has subscribed, the plugin writes `ingest_seen_file` (in the
 * persistence folder); a broker that starts with that file refuses devices and the gateway
 * (connection closed without CONNACK: clients retry, nothing is acknowledged) until the group
 * subscribes again. A broker whose group never subscribed (a fresh or a test broker) holds no
 * one. Remove the file when the group is retired for good (docs/operations.md).
 *
 * Options (plugin_opt_<key> in mosquitto.conf): service_password_file, device_password_file
 * (required), ingest_user, gateway_user, dispatcher_user, reserved_ids (comma separated),
 * max_sessions, ingest_share_group and ingest_seen_file (both or neither).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define CHECK_INTERVAL_NS 200000000L
#define MAX_HASH_BYTES 64
#define MAX_SALT_BYTES 64
#define MAX_RESERVED 32

enum role { ROLE_DEVICE = 0, ROLE_INGEST, ROLE_GATEWAY, ROLE_DISPATCHER, ROLE_SERVICE };

struct account {
	struct account *next;
	char *name;
	int role;
	int iterations;
	size_t salt_len;
	size_t hash_len;
	unsigned char salt[MAX_SALT_BYTES];
	unsigned char hash[MAX_HASH_BYTES];
};

struct table {
	struct account **buckets;
	size_t nbuckets;
	size_t count;
};

struct session {
	const struct mosquitto *client;
	char *client_id;
};

struct user_sessions {
	struct user_sessions *next;
	char *name;
	size_t count;
	size_t capacity;
	struct session *items;
};

struct watched_file {
	const char *path;
	bool seen;
	struct stat last;
	struct table accounts;
};

/* A connection to drop on the next tick (never from inside a login: the connecting client
 * may be one of them). Devices: by client id, if that client still holds the session. */
struct pending_kick {
	char *username;
	char *client_id;
	const struct mosquitto *client;
};

struct plugin_state {
	mosquitto_plugin_id_t *id;
	struct watched_file services;
	struct watched_file devices;
	const char *role_users[ROLE_SERVICE];
	char *reserved_buffer;
	const char *reserved[MAX_RESERVED];
	size_t reserved_count;
	size_t max_sessions;
	struct timespec last_check;
	struct user_sessions **sessions;
	size_t session_buckets;
	struct pending_kick *kicks;
	size_t kick_count;
	size_t kick_capacity;
	const char *share_prefix; /* "$share/<ingest_share_group>/", or NULL: hold no one */
	char *share_prefix_buffer;
	const char *seen_file;
	bool holding; /* publishers wait until ingest's group subscribes */
	bool group_live;
	uint64_t held;
};

/* ---- small helpers ---------------------------------------------------------------- */

static uint64_t hash_name(const char *name)
{
	uint64_t h = 1469598103934665603ULL; /* FNV-1a */
	for(const unsigned char *p = (const unsigned char *)name; *p; p++){
		h ^= *p;
		h *= 1099511628211ULL;
	}
	return h;
}

static bool starts_with(const char *text, const char *prefix)
{
	return strncmp(text, prefix, strlen(prefix)) == 0;
}

/* Whether `name` is `prefix` followed by `-` and at least one character. */
static bool dash_extends(const char *name, const char *prefix, size_t prefix_len)
{
	return strncmp(name, prefix, prefix_len) == 0 && name[prefix_len] == '-'
		&& name[prefix_len + 1] != '\0';
}

static long elapsed_ns(const struct timespec *since, const struct timespec *now)
{
	return (now->tv_sec - since->tv_sec) * 1000000000L + (now->tv_nsec - since->tv_nsec);
}

/* ---- account tables --------------------------------------------------------------- */

static void table_free(struct table *table)
{
	for(size_t i = 0; i < table->nbuckets; i++){
		struct account *account = table->buckets[i];
		while(account){
			struct account *next = account->next;
			free(account->name);
			free(account);
			account = next;
		}
	}
	free(table->buckets);
	table->buckets = NULL;
	table->nbuckets = 0;
	table->count = 0;
}

static const struct account *table_find(const struct table *table, const char *name)
{
	if(table->nbuckets == 0) return NULL;
	for(const struct account *account = table->buckets[hash_name(name) % table->nbuckets];
			account; account = account->next){
		if(strcmp(account->name, name) == 0) return account;
	}
	return NULL;
}

static void table_put(struct table *table, struct account *account)
{
	size_t index = hash_name(account->name) % table->nbuckets;
	struct account **slot = &table->buckets[index];
	for(struct account *old = *slot; old; slot = &old->next, old = old->next){
		if(strcmp(old->name, account->name) == 0){
			/* a later line for the same user wins, as in mosquitto_passwd files */
			account->next = old->next;
			*slot = account;
			free(old->name);
			free(old);
			return;
		}
	}
	account->next = table->buckets[index];
	table->buckets[index] = account;
	table->count++;
}

/* Decode standard base64; returns the length, or -1 when it is not valid base64. */
static int base64_decode(const char *text, size_t text_len, unsigned char *out, size_t out_max)
{
	unsigned char buffer[3 * ((MAX_HASH_BYTES + MAX_SALT_BYTES) / 3 + 2)];
	if(text_len == 0 || text_len % 4 != 0 || (text_len / 4) * 3 > sizeof(buffer)) return -1;
	int decoded = EVP_DecodeBlock(buffer, (const unsigned char *)text, (int)text_len);
	if(decoded < 0) return -1;
	if(text[text_len - 1] == '=') decoded--;
	if(text[text_len - 2] == '=') decoded--;
	if(decoded <= 0 || (size_t)decoded > out_max) return -1;
	memcpy(out, buffer, (size_t)decoded);
	return decoded;
}

/* Parse `$7$<iterations>$<b64 salt>$<b64 hash>`; false when the line is not one. */
static bool parse_hash(const char *text, struct account *account)
{
	if(strncmp(text, "$7$", 3) != 0) return false;
	char *end = NULL;
	errno = 0;
	long iterations = strtol(text + 3, &end, 10);
	if(errno != 0 || end == text + 3 || *end != '$' || iterations < 1 || iterations > 10000000){
		return false;
	}
	const char *salt = end + 1;
	const char *dollar = strchr(salt, '$');
	if(dollar == NULL) return false;
	const char *hash = dollar + 1;
	int salt_len = base64_decode(salt, (size_t)(dollar - salt), account->salt, MAX_SALT_BYTES);
	int hash_len = base64_decode(hash, strlen(hash), account->hash, MAX_HASH_BYTES);
	if(salt_len <= 0 || hash_len <= 0) return false;
	account->iterations = (int)iterations;
	account->salt_len = (size_t)salt_len;
	account->hash_len = (size_t)hash_len;
	return true;
}

static int role_of_service(const struct plugin_state *state, const char *name)
{
	for(int role = ROLE_INGEST; role < ROLE_SERVICE; role++){
		if(state->role_users[role] && strcmp(state->role_users[role], name) == 0) return role;
	}
	return ROLE_SERVICE;
}

/* Read `path` into `table` (fresh); false (table untouched) when it cannot be read. */
static bool load_file(const struct plugin_state *state, const char *path, bool services,
		struct table *table)
{
	FILE *file = fopen(path, "r");
	if(file == NULL){
		if(errno == ENOENT){
			table->nbuckets = 64;
			table->buckets = calloc(table->nbuckets, sizeof(struct account *));
			table->count = 0;
			mosquitto_log_printf(MOSQ_LOG_WARNING, "cityops_auth: %s missing: no accounts in it",
					path);
			return table->buckets != NULL;
		}
		mosquitto_log_printf(MOSQ_LOG_ERR, "cityops_auth: cannot read %s: %s", path,
				strerror(errno));
		return false;
	}
	size_t lines = 0;
	int c;
	while((c = fgetc(file)) != EOF){
		if(c == '\n') lines++;
	}
	rewind(file);
	table->nbuckets = lines < 32 ? 64 : lines * 2;
	table->buckets = calloc(table->nbuckets, sizeof(struct account *));
	table->count = 0;
	if(table->buckets == NULL){
		fclose(file);
		return false;
	}
	char *line = NULL;
	size_t line_cap = 0;
	ssize_t len;
	size_t number = 0;
	size_t skipped = 0;
	while((len = getline(&line, &line_cap, file)) != -1){
		number++;
		while(len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r' || line[len - 1] == ' ')){
			line[--len] = '\0';
		}
		if(len == 0 || line[0] == '#') continue;
		char *colon = strchr(line, ':');
		struct account *account = calloc(1, sizeof(*account));
		if(account == NULL) break;
		if(colon == NULL || colon == line || !parse_hash(colon + 1, account)){
			free(account);
			skipped++;
			continue;
		}
		*colon = '\0';
		account->name = strdup(line);
		if(account->name == NULL){
			free(account);
			break;
		}
		account->role = services ? role_of_service(state, account->name) : ROLE_DEVICE;
		table_put(table, account);
	}
	free(line);
	fclose(file);
	if(skipped > 0){
		mosquitto_log_printf(MOSQ_LOG_WARNING,
				"cityops_auth: %s: %zu lines are not username:$7$ hashes, ignored", path, skipped);
	}
	return true;
}

static bool same_secret(const struct account *a, const struct account *b)
{
	return a->iterations == b->iterations && a->salt_len == b->salt_len
		&& a->hash_len == b->hash_len && memcmp(a->salt, b->salt, a->salt_len) == 0
		&& memcmp(a->hash, b->hash, a->hash_len) == 0;
}

static size_t queue_kicks(struct plugin_state *state, const struct table *old_table,
		const struct table *new_table);

static bool file_changed(struct watched_file *file, struct stat *now, bool *exists)
{
	*exists = stat(file->path, now) == 0;
	if(!file->seen) return true;
	bool existed = file->last.st_ino != 0;
	if(*exists != existed) return true;
	if(!*exists) return false;
	return now->st_ino != file->last.st_ino || now->st_dev != file->last.st_dev
		|| now->st_size != file->last.st_size
		|| now->st_mtim.tv_sec != file->last.st_mtim.tv_sec
		|| now->st_mtim.tv_nsec != file->last.st_mtim.tv_nsec;
}

static void refresh_file(struct plugin_state *state, struct watched_file *file, bool services)
{
	struct stat now;
	bool exists;
	if(!file_changed(file, &now, &exists)) return;
	struct table fresh = {0};
	if(!load_file(state, file->path, services, &fresh)) return;
	size_t kicked = file->seen ? queue_kicks(state, &file->accounts, &fresh) : 0;
	table_free(&file->accounts);
	file->accounts = fresh;
	if(exists){
		file->last = now;
	}else{
		memset(&file->last, 0, sizeof(file->last));
	}
	file->seen = true;
	mosquitto_log_printf(MOSQ_LOG_INFO, "cityops_auth: loaded %zu accounts from %s (%zu revoked)",
			fresh.count, file->path, kicked);
}

static void refresh(struct plugin_state *state, bool force)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	if(!force && elapsed_ns(&state->last_check, &now) < CHECK_INTERVAL_NS) return;
	state->last_check = now;
	refresh_file(state, &state->services, true);
	refresh_file(state, &state->devices, false);
}

/* The account behind `username`: service accounts shadow devices of the same name. */
static const struct account *find_account(const struct plugin_state *state, const char *username)
{
	const struct account *account = table_find(&state->services.accounts, username);
	return account ? account : table_find(&state->devices.accounts, username);
}

static bool is_reserved(const struct plugin_state *state, const char *name)
{
	for(size_t i = 0; i < state->reserved_count; i++){
		const char *reserved = state->reserved[i];
		if(strcmp(name, reserved) == 0 || dash_extends(name, reserved, strlen(reserved))){
			return true;
		}
	}
	return table_find(&state->services.accounts, name) != NULL;
}

/* ---- sessions per device ---------------------------------------------------------- */

static struct user_sessions **sessions_slot(struct plugin_state *state, const char *name)
{
	struct user_sessions **slot = &state->sessions[hash_name(name) % state->session_buckets];
	while(*slot && strcmp((*slot)->name, name) != 0) slot = &(*slot)->next;
	return slot;
}

static size_t sessions_other_ids(struct plugin_state *state, const char *name, const char *id)
{
	struct user_sessions *user = *sessions_slot(state, name);
	size_t others = 0;
	if(user == NULL) return 0;
	for(size_t i = 0; i < user->count; i++){
		/* a reconnect with the same client id takes the old connection over */
		if(strcmp(user->items[i].client_id, id) != 0) others++;
	}
	return others;
}

static bool sessions_add(struct plugin_state *state, const char *name,
		const struct mosquitto *client, const char *id)
{
	struct user_sessions **slot = sessions_slot(state, name);
	struct user_sessions *user = *slot;
	if(user == NULL){
		user = calloc(1, sizeof(*user));
		if(user == NULL) return false;
		user->name = strdup(name);
		if(user->name == NULL){
			free(user);
			return false;
		}
		*slot = user;
	}
	if(user->count == user->capacity){
		size_t capacity = user->capacity ? user->capacity * 2 : 4;
		struct session *items = realloc(user->items, capacity * sizeof(*items));
		if(items == NULL) return false;
		user->items = items;
		user->capacity = capacity;
	}
	char *copy = strdup(id);
	if(copy == NULL) return false;
	user->items[user->count].client = client;
	user->items[user->count].client_id = copy;
	user->count++;
	return true;
}

static void sessions_remove(struct plugin_state *state, const char *name,
		const struct mosquitto *client)
{
	struct user_sessions **slot = sessions_slot(state, name);
	struct user_sessions *user = *slot;
	if(user == NULL) return;
	for(size_t i = 0; i < user->count; i++){
		if(user->items[i].client == client){
			free(user->items[i].client_id);
			user->items[i] = user->items[user->count - 1];
			user->count--;
			break;
		}
	}
	if(user->count == 0){
		*slot = user->next;
		free(user->items);
		free(user->name);
		free(user);
	}
}

static bool push_kick(struct plugin_state *state, const char *username, const char *client_id,
		const struct mosquitto *client)
{
	if(state->kick_count == state->kick_capacity){
		size_t capacity = state->kick_capacity ? state->kick_capacity * 2 : 16;
		struct pending_kick *kicks = realloc(state->kicks, capacity * sizeof(*kicks));
		if(kicks == NULL) return false;
		state->kicks = kicks;
		state->kick_capacity = capacity;
	}
	struct pending_kick *kick = &state->kicks[state->kick_count];
	kick->username = strdup(username);
	kick->client_id = client_id ? strdup(client_id) : NULL;
	kick->client = client;
	if(kick->username == NULL || (client_id && kick->client_id == NULL)){
		free(kick->username);
		free(kick->client_id);
		return false;
	}
	state->kick_count++;
	return true;
}

/* Queue the connections of every account that is gone or has a new password; returns how many
 * accounts that were. */
static size_t queue_kicks(struct plugin_state *state, const struct table *old_table,
		const struct table *new_table)
{
	size_t revoked = 0;
	for(size_t i = 0; i < old_table->nbuckets; i++){
		for(const struct account *old = old_table->buckets[i]; old; old = old->next){
			const struct account *now = table_find(new_table, old->name);
			if(now != NULL && same_secret(old, now)) continue;
			revoked++;
			if(old->role != ROLE_DEVICE){
				push_kick(state, old->name, NULL, NULL);
				continue;
			}
			const struct user_sessions *user = *sessions_slot(state, old->name);
			for(size_t j = 0; user && j < user->count; j++){
				push_kick(state, old->name, user->items[j].client_id, user->items[j].client);
			}
		}
	}
	return revoked;
}

static bool session_still_held(struct plugin_state *state, const struct pending_kick *kick)
{
	const struct user_sessions *user = *sessions_slot(state, kick->username);
	for(size_t i = 0; user && i < user->count; i++){
		if(user->items[i].client == kick->client
				&& strcmp(user->items[i].client_id, kick->client_id) == 0){
			return true;
		}
	}
	return false;
}

static void flush_kicks(struct plugin_state *state)
{
	/* kicking calls on_disconnect, which edits the sessions, not this list */
	for(size_t i = 0; i < state->kick_count; i++){
		struct pending_kick *kick = &state->kicks[i];
		if(kick->client_id == NULL){
			mosquitto_kick_client_by_username(kick->username, false);
		}else if(session_still_held(state, kick)){
			mosquitto_kick_client_by_clientid(kick->client_id, false);
		}
		free(kick->username);
		free(kick->client_id);
	}
	state->kick_count = 0;
}

/* ---- callbacks -------------------------------------------------------------------- */

static bool password_matches(const struct account *account, const char *password)
{
	unsigned char derived[MAX_HASH_BYTES];
	if(PKCS5_PBKDF2_HMAC(password, (int)strlen(password), account->salt, (int)account->salt_len,
				account->iterations, EVP_sha512(), (int)account->hash_len, derived) != 1){
		return false;
	}
	return CRYPTO_memcmp(derived, account->hash, account->hash_len) == 0;
}

/* Device client ids: the username, or username-suffix unless another account owns a longer
 * `-` prefix of it (device `wb` may not use `wb-0001`, the id of device `wb-0001`). */
static bool client_id_allowed(const struct plugin_state *state, const char *username,
		const char *id)
{
	size_t name_len = strlen(username);
	if(strcmp(id, username) == 0) return true;
	if(!dash_extends(id, username, name_len)) return false;
	char *copy = strdup(id);
	if(copy == NULL) return false;
	bool allowed = !is_reserved(state, copy) && find_account(state, copy) == NULL;
	for(char *dash = strchr(copy + name_len + 1, '-'); allowed && dash; dash = strchr(dash + 1, '-')){
		*dash = '\0';
		allowed = find_account(state, copy) == NULL;
		*dash = '-';
	}
	free(copy);
	return allowed;
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_basic_auth *ed = event_data;
	struct plugin_state *state = userdata;
	(void)event;

	if(ed->username == NULL || ed->password == NULL) return MOSQ_ERR_AUTH;
	refresh(state, false);
	const struct account *account = find_account(state, ed->username);
	if(account == NULL || !password_matches(account, ed->password)){
		/* provisioned a moment ago? stat now rather than at the next check */
		refresh(state, true);
		account = find_account(state, ed->username);
		if(account == NULL || !password_matches(account, ed->password)) return MOSQ_ERR_AUTH;
	}
	if((account->role == ROLE_DEVICE || account->role == ROLE_GATEWAY) && state->holding){
		if(state->held++ % 1000 == 0){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"cityops_auth: holding %s until ingest's %s subscriptions are back "
					"(%" PRIu64 " connects held)", ed->username, state->share_prefix,
					state->held);
		}
		return MOSQ_ERR_CONN_REFUSED; /* closed without CONNACK: retry, nothing acked */
	}
	if(account->role != ROLE_DEVICE) return MOSQ_ERR_SUCCESS;

	const char *id = mosquitto_client_id(ed->client);
	if(is_reserved(state, ed->username)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "cityops_auth: refused device %s: reserved name",
				ed->username);
		return MOSQ_ERR_AUTH;
	}
	if(id == NULL || !client_id_allowed(state, ed->username, id)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"cityops_auth: refused device %s: client id %s is not its own", ed->username,
				id ? id : "(none)");
		return MOSQ_ERR_AUTH;
	}
	if(sessions_other_ids(state, ed->username, id) >= state->max_sessions){
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"cityops_auth: refused device %s: %zu sessions already connected", ed->username,
				state->max_sessions);
		return MOSQ_ERR_AUTH;
	}
	if(!sessions_add(state, ed->username, ed->client, id)) return MOSQ_ERR_NOMEM;
	return MOSQ_ERR_SUCCESS;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	(void)event;
	if(username != NULL) sessions_remove(userdata, username, ed->client);
	return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)event_data;
	refresh(userdata, false);
	flush_kicks(userdata);
	return MOSQ_ERR_SUCCESS;
}

/* Split a topic or filter into at most `max` levels; returns the count (max + 1: too deep). */
static size_t split_levels(const char *topic, const char **starts, size_t *lens, size_t max)
{
	size_t count = 0;
	const char *start = topic;
	for(;;){
		const char *slash = strchr(start, '/');
		size_t len = slash ? (size_t)(slash - start) : strlen(start);
		if(count == max) return max + 1;
		starts[count] = start;
		lens[count] = len;
		count++;
		if(slash == NULL) return count;
		start = slash + 1;
	}
}

static bool level_is(const char *start, size_t len, const char *word)
{
	return strlen(word) == len && strncmp(start, word, len) == 0;
}

/* A concrete level: not empty, no wildcard. */
static bool level_plain(const char *start, size_t len)
{
	return len > 0 && memchr(start, '+', len) == NULL && memchr(start, '#', len) == NULL;
}

#define MAX_LEVELS 16

struct topic {
	size_t count;
	const char *starts[MAX_LEVELS];
	size_t lens[MAX_LEVELS];
};

/* `city/{kind}/{id}/...` with concrete kind and id (owner NULL: any device). */
static bool device_tree(const struct topic *t, const char *owner)
{
	if(t->count < 4 || t->count > MAX_LEVELS || !level_is(t->starts[0], t->lens[0], "city")){
		return false;
	}
	if(!level_plain(t->starts[1], t->lens[1]) || !level_plain(t->starts[2], t->lens[2])){
		return false;
	}
	return owner == NULL || level_is(t->starts[2], t->lens[2], owner);
}

static bool is_channel(const struct topic *t)
{
	return t->count == 4 && (level_is(t->starts[3], t->lens[3], "telemetry")
			|| level_is(t->starts[3], t->lens[3], "status"));
}

static bool is_result(const struct topic *t)
{
	return t->count == 5 && level_is(t->starts[3], t->lens[3], "commands")
		&& level_is(t->starts[4], t->lens[4], "result");
}

static bool is_command(const struct topic *t)
{
	return t->count >= 4 && level_is(t->starts[3], t->lens[3], "commands") && !is_result(t);
}

static bool all_plain(const struct topic *t)
{
	for(size_t i = 0; i < t->count; i++){
		if(!level_plain(t->starts[i], t->lens[i])) return false;
	}
	return true;
}

/* A service's filter: anything under city/, optionally `$share/<group>/` in front; what it
 * may receive is decided per message by the read check. */
static bool service_filter(const char *filter)
{
	if(starts_with(filter, "$share/")){
		const char *group_end = strchr(filter + 7, '/');
		if(group_end == NULL || group_end == filter + 7) return false;
		filter = group_end + 1;
	}
	return starts_with(filter, "city/");
}

/* Ingest's group subscribed (again): record it once, and let publishers in. */
static void ingest_group_subscribed(struct plugin_state *state)
{
	state->holding = false;
	if(state->group_live) return;
	state->group_live = true;
	FILE *seen = fopen(state->seen_file, "w");
	if(seen == NULL || fprintf(seen, "%s\n", state->share_prefix) < 0 || fclose(seen) != 0){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "cityops_auth: could not write %s: %s",
				state->seen_file, strerror(errno));
		return;
	}
	mosquitto_log_printf(MOSQ_LOG_INFO, "cityops_auth: %s subscribed; publishers accepted",
			state->share_prefix);
}

static bool ingest_reads(const struct topic *t)
{
	return is_channel(t) || is_result(t);
}

static bool dispatcher_reads(const struct topic *t)
{
	return is_result(t);
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	struct plugin_state *state = userdata;
	(void)event;

	if(ed->access == MOSQ_ACL_UNSUBSCRIBE) return MOSQ_ERR_SUCCESS;
	const char *username = mosquitto_client_username(ed->client);
	if(username == NULL || ed->topic == NULL) return MOSQ_ERR_ACL_DENIED;
	const struct account *account = find_account(state, username);
	if(account == NULL) return MOSQ_ERR_ACL_DENIED; /* revoked, kick pending */
	if(ed->access == MOSQ_ACL_WRITE && ed->retain) return MOSQ_ERR_ACL_DENIED;

	struct topic t;
	t.count = split_levels(ed->topic, t.starts, t.lens, MAX_LEVELS);
	bool allowed = false;
	switch(account->role){
		case ROLE_DEVICE:
			if(ed->access == MOSQ_ACL_WRITE){
				allowed = device_tree(&t, username) && (is_channel(&t) || is_result(&t));
			}else{
				/* subscribe and read: exact topics under its own commands, nothing else */
				allowed = device_tree(&t, username) && all_plain(&t)
					&& level_is(t.starts[3], t.lens[3], "commands");
			}
			break;
		case ROLE_INGEST:
			if(ed->access == MOSQ_ACL_SUBSCRIBE){
				allowed = service_filter(ed->topic);
				if(allowed && state->share_prefix && starts_with(ed->topic, state->share_prefix)){
					ingest_group_subscribed(state);
				}
			}else if(ed->access == MOSQ_ACL_READ){
				allowed = device_tree(&t, NULL) && ingest_reads(&t);
			}
			break;
		case ROLE_GATEWAY:
			allowed = ed->access == MOSQ_ACL_WRITE && device_tree(&t, NULL) && is_channel(&t);
			break;
		case ROLE_DISPATCHER:
			if(ed->access == MOSQ_ACL_WRITE){
				allowed = device_tree(&t, NULL) && is_command(&t);
			}else if(ed->access == MOSQ_ACL_SUBSCRIBE){
				allowed = service_filter(ed->topic);
			}else if(ed->access == MOSQ_ACL_READ){
				allowed = device_tree(&t, NULL) && dispatcher_reads(&t);
			}
			break;
		default:
			allowed = false;
	}
	return allowed ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
}

/* ---- plugin entry points ---------------------------------------------------------- */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static const char *option(struct mosquitto_opt *options, int count, const char *key,
		const char *fallback)
{
	for(int i = 0; i < count; i++){
		if(strcmp(options[i].key, key) == 0) return options[i].value;
	}
	return fallback;
}

static void state_free(struct plugin_state *state)
{
	table_free(&state->services.accounts);
	table_free(&state->devices.accounts);
	for(size_t i = 0; state->sessions && i < state->session_buckets; i++){
		struct user_sessions *user = state->sessions[i];
		while(user){
			struct user_sessions *next = user->next;
			for(size_t j = 0; j < user->count; j++) free(user->items[j].client_id);
			free(user->items);
			free(user->name);
			free(user);
			user = next;
		}
	}
	free(state->sessions);
	for(size_t i = 0; i < state->kick_count; i++){
		free(state->kicks[i].username);
		free(state->kicks[i].client_id);
	}
	free(state->kicks);
	free(state->reserved_buffer);
	free(state->share_prefix_buffer);
	free(state);
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	struct plugin_state *state = calloc(1, sizeof(*state));
	if(state == NULL) return MOSQ_ERR_NOMEM;
	state->id = identifier;
	state->services.path = option(options, option_count, "service_password_file", NULL);
	state->devices.path = option(options, option_count, "device_password_file", NULL);
	state->role_users[ROLE_INGEST] = option(options, option_count, "ingest_user", "ingest");
	state->role_users[ROLE_GATEWAY] = option(options, option_count, "gateway_user", "gateway");
	state->role_users[ROLE_DISPATCHER] = option(options, option_count, "dispatcher_user",
			"dispatcher");
	const char *max_sessions = option(options, option_count, "max_sessions", "3");
	char *end = NULL;
	long sessions = strtol(max_sessions, &end, 10);
	if(state->services.path == NULL || state->devices.path == NULL){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"cityops_auth: plugin_opt_service_password_file and "
				"plugin_opt_device_password_file are required");
		state_free(state);
		return MOSQ_ERR_INVAL;
	}
	if(end == max_sessions || *end != '\0' || sessions < 1 || sessions > 1000){
		mosquitto_log_printf(MOSQ_LOG_ERR, "cityops_auth: max_sessions must be 1..1000");
		state_free(state);
		return MOSQ_ERR_INVAL;
	}
	state->max_sessions = (size_t)sessions;
	const char *group = option(options, option_count, "ingest_share_group", NULL);
	state->seen_file = option(options, option_count, "ingest_seen_file", NULL);
	if((group == NULL) != (state->seen_file == NULL) || (group && !*group)){
		mosquitto_log_printf(MOSQ_LOG_ERR,
				"cityops_auth: ingest_share_group and ingest_seen_file go together");
		state_free(state);
		return MOSQ_ERR_INVAL;
	}
	if(group){
		size_t len = strlen("$share/") + strlen(group) + 2;
		state->share_prefix_buffer = malloc(len);
		if(state->share_prefix_buffer == NULL){
			state_free(state);
			return MOSQ_ERR_NOMEM;
		}
		snprintf(state->share_prefix_buffer, len, "$share/%s/", group);
		state->share_prefix = state->share_prefix_buffer;
		struct stat seen;
		state->holding = stat(state->seen_file, &seen) == 0;
		if(state->holding){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"cityops_auth: %s was subscribed before this start (%s): publishers "
					"wait until it subscribes again", state->share_prefix, state->seen_file);
		}
	}
	state->reserved_buffer = strdup(option(options, option_count, "reserved_ids", ""));
	state->session_buckets = 4096;
	state->sessions = calloc(state->session_buckets, sizeof(struct user_sessions *));
	if(state->reserved_buffer == NULL || state->sessions == NULL){
		state_free(state);
		return MOSQ_ERR_NOMEM;
	}
	char *saveptr = NULL;
	for(char *token = strtok_r(state->reserved_buffer, ", ", &saveptr);
			token && state->reserved_count < MAX_RESERVED;
			token = strtok_r(NULL, ", ", &saveptr)){
		state->reserved[state->reserved_count++] = token;
	}
	for(int role = ROLE_INGEST; role < ROLE_SERVICE; role++){
		if(state->reserved_count < MAX_RESERVED){
			state->reserved[state->reserved_count++] = state->role_users[role];
		}
	}
	refresh(state, true);
	if(!state->services.seen || !state->devices.seen){
		state_free(state);
		return MOSQ_ERR_UNKNOWN;
	}
	*userdata = state;
	int rc = mosquitto_callback_register(identifier, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, state);
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, state);
	}
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_TICK, on_tick, NULL, state);
	}
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(identifier, MOSQ_EVT_DISCONNECT, on_disconnect, NULL,
				state);
	}
	mosquitto_log_printf(MOSQ_LOG_INFO,
			"cityops_auth: services from %s, devices from %s, %zu sessions per device",
			state->services.path, state->devices.path, state->max_sessions);
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	struct plugin_state *state = userdata;
	(void)options;
	(void)option_count;
	if(state == NULL) return MOSQ_ERR_SUCCESS;
	mosquitto_callback_unregister(state->id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(state->id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(state->id, MOSQ_EVT_TICK, on_tick, NULL);
	mosquitto_callback_unregister(state->id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	state_free(state);
	return MOSQ_ERR_SUCCESS;
}
